"""Code versions: what the code does changes the hash; comments, docstrings and import paths do not."""

from __future__ import annotations

import safeport.mappers.ridge
import safeport.mappers.vectors
from safeport.codehash import code_hash, source_digest

BASE = '''"""A module docstring."""
from __future__ import annotations

import numpy as np
from safeport.mappers.base import as_matrix


def scale(x: np.ndarray, k: float = 2.0) -> np.ndarray:
    """Why it scales."""
    return as_matrix(x, "x") * k  # a comment
'''


def test_comments_docstrings_and_import_layout_keep_the_digest() -> None:
    same = [
        BASE.replace("# a comment", "# another comment"),
        BASE.replace('"""Why it scales."""', '"""Why it scales, said differently."""'),
        BASE.replace('"""A module docstring."""\n', ""),
        BASE.replace("safeport.mappers.base", "mappers.base"),  # the stage-folder rename
        BASE.replace(
            "import numpy as np\nfrom safeport.mappers.base import as_matrix",
            "from safeport.mappers.base import as_matrix\n\nimport numpy as np",
        ),
        BASE.replace("def scale", "\n\ndef scale"),
    ]
    for variant in same:
        assert source_digest(variant) == source_digest(BASE), variant


def test_what_the_code_does_changes_the_digest() -> None:
    different = [
        BASE.replace("* k", "* k * 1"),
        BASE.replace("k: float = 2.0", "k: float = 3.0"),
        BASE.replace("from safeport.mappers.base import as_matrix", "from safeport.mappers.other import as_matrix"),
        BASE.replace("import numpy as np", "import numpy as np\nimport scipy"),
    ]
    for variant in different:
        assert source_digest(variant) != source_digest(BASE), variant


def test_code_hash_ignores_module_order_and_repeats() -> None:
    a, b = safeport.mappers.ridge, safeport.mappers.vectors
    assert code_hash([a, b]) == code_hash([b, a, a, None])
    assert code_hash([a]) != code_hash([a, b])
    assert len(code_hash([a])) == 12
