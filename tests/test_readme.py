"""The README's Python examples run, in order, and print what their comments say.

A ``print(...)`` line (or the last line of a multi-line call) that ends in
``# text`` must print a line that ``text`` starts with; the rest of the
comment may explain it.
"""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def expected_prints(source):
    """The trailing comment of each print statement, None where there is none."""
    expected, in_print = [], False
    for line in source.splitlines():
        code, _, comment = line.partition("  #")
        in_print = in_print or code.lstrip().startswith("print(")
        if in_print and code.count("(") <= code.count(")"):   # the statement ends here
            expected.append(comment.strip() or None)
            in_print = False
    return expected


def test_readme_examples_run_and_print_what_they_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)           # examples write files
    blocks = python_blocks()
    assert len(blocks) >= 8
    namespace, checked = {}, 0
    for number, source in enumerate(blocks):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(source, f"README block {number}", "exec"), namespace)
        printed = stdout.getvalue().splitlines()
        expected = expected_prints(source)
        assert len(printed) == len(expected), f"block {number}: one line per print"
        for got, want in zip(printed, expected):
            if want is not None:
                assert want.startswith(got), f"block {number}: printed {got!r}, README says {want!r}"
                checked += 1
    assert checked >= 10
