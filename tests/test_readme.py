"""Every Python block of the README runs on its own and prints what it says.

Each block runs as a newcomer would paste it: in a fresh interpreter, in a
fresh temporary directory, with nothing from the blocks before it. Every
``print(...)`` statement ends (on its last line) with a ``# ...`` comment,
and the lines the block prints must equal those comments, in order,
exactly: a wrong figure, an extra line or a missing one fails.
"""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def expected_output(source):
    """The comment ending each print statement, in order; None for a print without one."""
    expected, in_print = [], False
    for line in source.splitlines():
        code, sep, comment = line.partition("  #")
        in_print = in_print or code.lstrip().startswith("print(")
        if in_print and code.count("(") <= code.count(")"):   # the statement ends here
            expected.append(comment.strip() if sep else None)
            in_print = False
    return expected


def mismatch(source, cwd):
    """Run ``source`` in a fresh interpreter in ``cwd``; what is wrong with it, or None."""
    expected = expected_output(source)
    if None in expected:
        return f"print statement {expected.index(None) + 1} has no '# expected output' comment"
    proc = subprocess.run([sys.executable, "-c", source], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        return f"exited with {proc.returncode}:\n{proc.stderr[-2000:]}"
    printed = proc.stdout.splitlines()
    if printed != expected:
        return f"printed {printed!r}, the README says {expected!r}"
    return None


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 8
    assert sum(len(expected_output(b)) for b in BLOCKS) >= 10


@pytest.mark.parametrize("number", range(len(BLOCKS)), ids=lambda n: f"block{n}")
def test_block_runs_alone_and_prints_its_comments(number, tmp_path):
    problem = mismatch(BLOCKS[number], tmp_path)
    assert problem is None, f"README block {number}: {problem}\n--- block ---\n{BLOCKS[number]}"


@pytest.mark.parametrize("source, problem", [
    ("print(1 + 1)  # 3", "printed ['2']"),                    # a wrong figure
    ("print(2)  # 2\nprint(3)", "no '# expected output'"),     # a print left unchecked
    ("print(2)  # 2\nimport sys; sys.stdout.write('3\\n')",
     "printed ['2', '3']"),                                   # an extra line
    ("x = 1  # 1", None),                                      # no print: nothing expected
    ("print(np.zeros(1))  # [0.]", "NameError"),               # a missing import
    ("print(max(1,\n          2))  # 2", None),               # a print over two lines
])
def test_the_check_catches_what_it_must(source, problem, tmp_path):
    found = mismatch(source, tmp_path)
    if problem is None:
        assert found is None, found
    else:
        assert found is not None and problem in found, found
