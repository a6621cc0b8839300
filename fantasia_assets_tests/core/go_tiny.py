"""A tiny hand-made GO graph shared by the scoring and evaluation tests.

BP: root 8150 ← 1 ← 2; 8150 ← 3 (also part_of 1) ← 4 (alt id 99); 8150 ← 5 (used by nobody).
MF: root 3674 ← 10 ← 11. CC: root 5575 ← 20. GO:0000030 is obsolete.
"""

from __future__ import annotations

from pathlib import Path

TINY_OBO = """format-version: 1.2
data-version: tiny/2026

[Term]
id: GO:0008150
name: biological_process
namespace: biological_process

[Term]
id: GO:0000001
name: one
namespace: biological_process
is_a: GO:0008150 ! biological_process

[Term]
id: GO:0000002
name: two
namespace: biological_process
is_a: GO:0000001 ! one

[Term]
id: GO:0000003
name: three
namespace: biological_process
is_a: GO:0008150 ! biological_process
relationship: part_of GO:0000001 ! one

[Term]
id: GO:0000004
name: four
namespace: biological_process
alt_id: GO:0000099
is_a: GO:0000003 ! three

[Term]
id: GO:0000005
name: five
namespace: biological_process
is_a: GO:0008150 ! biological_process

[Term]
id: GO:0003674
name: molecular_function
namespace: molecular_function

[Term]
id: GO:0000010
name: ten
namespace: molecular_function
is_a: GO:0003674 ! molecular_function

[Term]
id: GO:0000011
name: eleven
namespace: molecular_function
is_a: GO:0000010 ! ten

[Term]
id: GO:0005575
name: cellular_component
namespace: cellular_component

[Term]
id: GO:0000020
name: twenty
namespace: cellular_component
is_a: GO:0005575 ! cellular_component

[Term]
id: GO:0000030
name: gone
namespace: biological_process
is_obsolete: true
"""


def tiny_obo(directory: Path) -> Path:
    path = Path(directory) / "tiny.obo"
    path.write_text(TINY_OBO)
    return path
