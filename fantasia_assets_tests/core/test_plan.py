"""A partition has one key: the sanitised form, the same in reports, records and Dagster."""

from __future__ import annotations

from fantasia_assets.core.exports import model_dir_name
from fantasia_assets.core.plan import ModelSpec, Partition


def test_partition_key_is_the_folder_form_of_the_model_name():
    assert Partition(ModelSpec("NEAR"), 1, 0).key == "NEAR|layer_0"
    assert Partition(ModelSpec("Prot-T5"), 2, None).key == "Prot-T5|layer_legacy"
    hostile = Partition(ModelSpec("a/b|c...d"), 3, 4)
    assert hostile.key == f"{model_dir_name('a/b|c...d')}|layer_4"
    assert "/" not in hostile.key and "..." not in hostile.key and hostile.key.count("|") == 1
    assert hostile.key.split("|")[0] == hostile.relative_dir().parts[0]


def test_partition_key_matches_the_dagster_partition_key():
    from fantasia_assets.defs.partitions import partition_key

    for name in ("NEAR", "a/b", "ensemble", "x" * 300):
        partition = Partition(ModelSpec(name), 1, 0)
        assert partition_key(partition) == partition.key
