"""Every measured figure in README.md and benchmarks/results/**/README.md is read from a committed results file.

Two marks, both HTML comments (invisible when rendered):

- `0.577<!-- from: benchmarks/results/multitask/quick/default.json#dev_average -->` right after a figure. The
  comment names N values; the doc's last N numbers before it (on its line, after any earlier comment there) must
  equal them, in order.
  `PATH#KEY` is a value of a JSON file (PATH relative to the doc's directory, as in a markdown link) and KEY its
  dotted path: `a.b.0` (a list index), `[any text]` (a key with dots or spaces; in a list, the dict whose `name` or
  `run` is that text), `*` (every element, in order), `0:10` (a slice), `{x,y.z}` (each of these paths, in order).
  `#KEY` reuses the doc's previous PATH; several refs separated by spaces give several values. A PATH ending in
  `.md` reads that file's markdown tables: rows by their first cell, columns by header (`table.md#[head-only][sst]`).
  A string value gives the numbers written in it. Items separated by `;` concatenate. An item with arithmetic is one
  derived value: `+ - * /`, parentheses and numbers (`#train_s / 60`), `mean min max median sum` over refs' values
  (`mean(#losses.0:10)`), `log exp` of one value. Keep these to unit changes, simple ratios and summaries of a
  stored curve; a derived figure worth quoting is better written into a results file by a committed command.
- `<!-- table: PATH -->` on the line before a markdown table: each row of the doc's table is a copy of the row of
  PATH (a table written by `adaptune report`) with the same first cell, cell for cell in the doc's columns (matched
  by header; `**` bold ignored).
Code (inline spans and fenced blocks) is not read: a mark or a number there is an example.

Rounding rule: a doc figure equals the file's value rounded to the digits it shows, that is |shown - value| is at
most half a unit of its last digit (an exact tie passes either way). Thousands separators are ignored; a `%` or unit
after the number is not part of it (store percentages as percentages, or multiply in the comment); `-` / `−` make a
number negative only after a space or an opening bracket (`63-137` is a range); 1.5e-3 is scientific notation.

A file a figure comes from must be tracked by git (when the checkout is a git repository).
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMENT = re.compile(r"<!--(.*?)-->", re.S)
CODE = re.compile(r"`[^`]*`")  # an inline code span
NUMBER = re.compile(
    r"(?:(?:(?<=[\s(\[{])|^)([-−+]))?"  # a sign only after a space or an opening bracket: 63-137 is a range
    r"(?<![\w.,])"  # not inside a word, a version or a larger number
    r"((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:[eE]([-−+]?\d+))?")


def docs() -> list[Path]:
    """README.md and every results README: each must mark its figures."""
    return [ROOT / "README.md", *sorted((ROOT / "benchmarks" / "results").rglob("README.md"))]


@dataclass(frozen=True)
class Shown:
    text: str
    value: float
    tolerance: float  # half a unit of the last digit shown
    start: int = 0
    end: int = 0


def numbers(text: str) -> list[Shown]:
    out = []
    for m in NUMBER.finditer(text):
        sign, digits, exp = m.group(1) or "", m.group(2), m.group(3)
        mantissa = digits.replace(",", "")
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        scale = 10.0 ** int(exp.replace("−", "-")) if exp else 1.0
        value = float(mantissa) * scale * (-1 if sign in "-−" and sign else 1)
        out.append(Shown(m.group(0), value, 0.5 * 10.0 ** -decimals * scale, m.start(), m.end()))
    return out


def agrees(shown: Shown, value: float) -> bool:
    return abs(shown.value - value) <= shown.tolerance + 1e-9 * max(1.0, abs(value))


# ---------------------------------------------------------------- reading the files


class FigureError(Exception):
    pass


def markdown_tables(text: str) -> dict[str, dict[str, str]]:
    """Every table of a markdown file: first cell -> {header: cell}; rows of later tables do not replace earlier."""
    rows: dict[str, dict[str, str]] = {}
    lines, i = text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            header, i = cells(lines[i]), i + 2
            while i < len(lines) and lines[i].startswith("|"):
                row = cells(lines[i])
                rows.setdefault(row[0], dict(zip(header, row)))
                i += 1
        else:
            i += 1
    return rows


def cells(line: str) -> list[str]:
    """The cells of a table row (an HTML comment in a cell is not part of it)."""
    line = COMMENT.sub("", line).strip()
    return [c.strip().replace("**", "") for c in line.strip("|").split("|")]


_loaded: dict[Path, object] = {}


def load(path: Path):
    if path not in _loaded:
        if not path.is_file():
            raise FigureError(f"{rel(path)}: no such file")
        text = path.read_text()
        _loaded[path] = markdown_tables(text) if path.suffix == ".md" else json.loads(text)
    return _loaded[path]


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:  # outside the checkout (the checker's own tests)
        return path.name


def key_steps(key: str) -> list[list[str]]:
    """`a.[b.c].{x,y}.*` -> [['a'], ['b.c'], ['x', 'y'], ['*']]: each step's alternatives."""
    steps, i = [], 0
    while i < len(key):
        if key[i] == ".":
            i += 1
            continue
        if key[i] in "[{":
            close, depth, j = "]" if key[i] == "[" else "}", 0, i
            while j < len(key):
                depth += {key[i]: 1, close: -1}.get(key[j], 0)
                if depth == 0:
                    break
                j += 1
            if j == len(key):
                raise FigureError(f"unbalanced {key[i]} in key {key!r}")
            inner = key[i + 1:j]
            steps.append([inner] if key[i] == "[" else [s.strip() for s in inner.split(",")])
            i = j + 1
        else:
            j = i
            while j < len(key) and key[j] not in ".[{":
                j += 1
            steps.append([key[i:j]])
            i = j
    return steps


def step(node, part: str, where: str):
    if part == "*":
        if isinstance(node, dict):
            return list(node.values())
        if isinstance(node, list):
            return list(node)
        raise FigureError(f"{where}: * on a {type(node).__name__}")
    if isinstance(node, dict):
        if part in node:
            return [node[part]]
    elif isinstance(node, list):
        if re.fullmatch(r"-?\d+", part) and -len(node) <= int(part) < len(node):
            return [node[int(part)]]
        if m := re.fullmatch(r"(-?\d*):(-?\d*)", part):  # a slice: its elements, in order
            return node[int(m[1]) if m[1] else None:int(m[2]) if m[2] else None]
        named = [x for x in node if isinstance(x, dict) and part in (x.get("name"), x.get("run"))]
        if len(named) == 1:
            return named
    raise FigureError(f"{where}: no {part!r}")


def walk(nodes: list, key: str, where: str) -> list:
    for alternatives in key_steps(key):
        if len(alternatives) == 1:
            nodes = [x for node in nodes for x in step(node, alternatives[0], where)]
        else:  # {a.b,c}: each alternative is a dotted path of its own
            nodes = [x for node in nodes for alt in alternatives for x in walk([node], alt, where)]
    return nodes


def resolve(data, key: str, where: str) -> list[float]:
    nodes = walk([data], key, f"{where}#{key}")
    values: list[float] = []
    for node in nodes:
        if isinstance(node, bool) or node is None or isinstance(node, (dict, list)):
            raise FigureError(f"{where}#{key}: not a number ({str(node)[:60]})")
        if isinstance(node, (int, float)):
            values.append(float(node))
        else:
            found = numbers(str(node))
            if not found:
                raise FigureError(f"{where}#{key}: no number in {node!r}")
            values += [s.value for s in found]
    return values


# ---------------------------------------------------------------- the comments


REF = re.compile(r"(?<![\w#])([\w./+\-]*)#")


def split_refs(item: str) -> list[tuple[int, int, str, str]]:
    """The refs of an item: (start, end, path, key); a key runs to a space, `,` or `)` outside brackets."""
    refs, pos = [], 0
    while (m := REF.search(item, pos)) is not None:
        j, depth = m.end(), 0
        while j < len(item):
            c = item[j]
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            elif depth == 0 and (c.isspace() or c in ",)"):
                break
            j += 1
        refs.append((m.start(), j, m.group(1), item[m.end():j]))
        pos = j
    return refs


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_FUNCTIONS = {"mean": statistics.mean, "median": statistics.median, "min": min, "max": max, "sum": sum,
              "log": lambda v: math.log(*v), "exp": lambda v: math.exp(*v)}


def evaluate(node, names: dict[str, list[float]]) -> float:
    if isinstance(node, ast.Expression):
        return evaluate(node.body, names)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id in names:
        if len(names[node.id]) != 1:
            raise FigureError(f"a ref in arithmetic names one value, not {len(names[node.id])} (mean(...)?)")
        return names[node.id][0]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](evaluate(node.left, names), evaluate(node.right, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -evaluate(node.operand, names)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords and node.args):  # over every value of its arguments
        args = [v for a in node.args for v in (names[a.id] if isinstance(a, ast.Name) and a.id in names
                                                else [evaluate(a, names)])]
        return float(_FUNCTIONS[node.func.id](args))
    raise FigureError(f"not simple arithmetic: {ast.dump(node)[:80]}")


def values_of(spec: str, doc: Path, last: list[Path]) -> list[float]:
    """The values a `from:` comment names, in order; `last` holds the doc's previous PATH (updated)."""
    out: list[float] = []
    for item in (s.strip() for s in spec.split(";")):
        refs = split_refs(item)
        if not refs:
            raise FigureError(f"no PATH#KEY in {item!r}")
        names, rest, pos = {}, [], 0
        resolved = []
        for n, (start, end, p, key) in enumerate(refs):
            if p:
                last[:] = [(doc.parent / p).resolve()]
            elif not last:
                raise FigureError(f"{item!r}: #{key} without a file before it")
            path = last[0]
            rest.append(item[pos:start])
            rest.append(f"_ref{n}")
            pos = end
            vals = resolve(load(path), key, rel(path))
            resolved.append(vals)
            names[f"_ref{n}"] = vals
        rest.append(item[pos:])
        expression = "".join(rest)
        if not re.sub(r"_ref\d+|\s", "", expression):  # refs only: their values, in order
            out += [v for vals in resolved for v in vals]
            continue
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError as e:
            raise FigureError(f"cannot read {item!r}: {e.msg}") from None
        out.append(evaluate(tree, names))
    return out


@dataclass
class Problem:
    doc: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.what}"


def check_text(text: str, doc: Path, tracked: set[str] | None = None) -> tuple[list[Problem], int]:
    """The problems of one doc, and the number of figures and table rows it checked."""
    problems, checked = [], 0
    lines = text.splitlines()
    name, last = rel(doc), []

    def used(path: Path, line: int) -> None:
        if tracked is not None and path.is_file() and rel(path) not in tracked:
            problems.append(Problem(name, line, f"{rel(path)} is not committed (git ls-files does not list it)"))

    fenced = False
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or line.lstrip().startswith("```"):
            continue  # code shows marks and numbers, it does not make them
        line = CODE.sub(lambda c: "\0" * len(c.group(0)), line)
        window_start = 0
        # comments blanked out (not to spaces: `63<!-- ... -->-137` is a range, not 63 and -137)
        on_line = numbers(COMMENT.sub(lambda c: "\0" * len(c.group(0)), line))
        for m in COMMENT.finditer(line):
            body = m.group(1).strip()
            before = [s for s in on_line if s.start >= window_start and s.end <= m.start()]
            window_start = m.end()
            if body.startswith("table:"):
                checked += check_table(lines, i, body[len("table:"):].strip(), doc, problems, used)
                continue
            if not body.startswith("from:"):
                if re.match(r"^(from|table)\b", body, re.I):
                    problems.append(Problem(name, i, f"malformed mark <!-- {body} -->"))
                continue
            spec = body[len("from:"):].strip()
            try:
                values = values_of(spec, doc, last)
            except FigureError as e:
                problems.append(Problem(name, i, str(e)))
                continue
            for _, _, p, _ in split_refs(spec):
                if p:
                    used((doc.parent / p).resolve(), i)
            shown = before
            if len(shown) < len(values):
                problems.append(Problem(name, i, f"{len(values)} values named, only {len(shown)} figures before "
                                                 f"<!-- {body} -->"))
                continue
            for s, v in zip(shown[len(shown) - len(values):], values):
                checked += 1
                if not agrees(s, v):
                    problems.append(Problem(name, i, f"the doc says {s.text.strip()}, the file {v:.6g} "
                                                     f"(<!-- {body} -->)"))
    return problems, checked


def check_table(lines: list[str], i: int, spec: str, doc: Path, problems: list, used) -> int:
    name, path = rel(doc), (doc.parent / spec).resolve()
    if i >= len(lines) or not lines[i].startswith("|"):
        problems.append(Problem(name, i, "<!-- table: ... --> is not followed by a table"))
        return 0
    try:
        rows = load(path)
    except FigureError as e:
        problems.append(Problem(name, i, str(e)))
        return 0
    used(path, i)
    header, n, j = cells(lines[i]), 0, i + 2
    while j < len(lines) and lines[j].startswith("|"):
        row = cells(lines[j])
        theirs = rows.get(row[0])
        j += 1
        if theirs is None:
            problems.append(Problem(name, j, f"row {row[0]!r} is not in {rel(path)}"))
            continue
        for column, cell in zip(header[1:], row[1:]):
            n += 1
            if column not in theirs:
                problems.append(Problem(name, j, f"column {column!r} is not in {rel(path)}"))
            elif theirs[column] != cell:
                problems.append(Problem(name, j, f"{row[0]} / {column}: the doc says {cell!r}, "
                                                 f"{rel(path)} {theirs[column]!r}"))
    return n


def tracked_files() -> set[str] | None:
    if not (ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.decode().split("\0")) - {""}


# ---------------------------------------------------------------- the docs


@pytest.fixture(scope="module")
def tracked():
    return tracked_files()


@pytest.mark.parametrize("doc", docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_marked_figure_agrees_with_its_file(doc, tracked):
    problems, checked = check_text(doc.read_text(), doc, tracked)
    assert not problems, "\n".join(map(str, problems))
    assert checked, f"{rel(doc)} marks no figure"


# ---------------------------------------------------------------- the checker itself


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({
        "dev": {"average": 0.5784, "sst": 0.2966}, "wall_s": 144.4, "mem": 2631.4,
        "seeds": [{"test": 0.7775, "ens": 0.78}, {"test": 0.8375, "ens": 0.8375}],
        "records": [{"name": "lora fwd [kernels]", "median_s": 0.3882}], "summary": "0.808 ± 0.019",
        "a.b": 1e-3}))
    (tmp_path / "table.md").write_text("| method | dev avg | % of full |\n|---|---|---|\n"
                                       "| head-only | 0.367 | 60.3% |\n| full | 0.608 | 100.0% |\n")
    return tmp_path


def check(tree, text: str) -> list[str]:
    problems, _ = check_text(text, tree / "README.md", tracked=None)
    return [p.what for p in problems]


def test_a_right_figure_passes_and_a_changed_one_is_reported(tree):
    assert check(tree, "dev average 0.578<!-- from: r.json#dev.average -->") == []
    assert check(tree, "dev average 0.58<!-- from: r.json#dev.average -->") == []  # fewer digits shown
    problems = check(tree, "dev average 0.579<!-- from: r.json#dev.average -->")
    assert len(problems) == 1 and "0.579" in problems[0] and "0.5784" in problems[0]
    assert check(tree, "dev 0.5784<!-- from: r.json#dev.average -->, SST 0.3<!-- from: #dev.sst -->") == []
    assert len(check(tree, "dev 0.578<!-- from: r.json#dev.average -->, SST 0.29<!-- from: #dev.sst -->")) == 1


def test_rounding_rule_half_a_unit_of_the_last_digit(tree):
    # 0.7775 is 0.77749999... in binary: .777 and .778 are both within half a unit
    assert check(tree, ".777/.780 .838/.838<!-- from: r.json#seeds.*.{test,ens} -->") == []
    assert check(tree, ".778/.780 .838/.838<!-- from: r.json#seeds.*.{test,ens} -->") == []
    assert len(check(tree, ".776/.780 .838/.838<!-- from: r.json#seeds.*.{test,ens} -->")) == 1
    assert check(tree, "2,631 MiB<!-- from: r.json#mem -->, 2.6 GB<!-- from: r.json#mem / 1000 -->") == []
    assert len(check(tree, "2,632 MiB<!-- from: r.json#mem -->")) == 1
    assert check(tree, "about 1e-3<!-- from: r.json#[a.b] -->, 2.4 min<!-- from: r.json#wall_s / 60 -->") == []
    assert check(tree, "0.808 ± 0.019<!-- from: r.json#summary -->; 388.2 ms<!-- from: "
                       "r.json#records.[lora fwd [kernels]].median_s * 1000 -->") == []
    assert check(tree, "−1.2<!-- from: r.json#wall_s / -120.33 -->") == []


def test_ranges_and_signs(tree):
    assert [s.value for s in numbers("63-137 s, +4.9, −5.7 (-1.7) 1,536 of 2.13.0 nf4 T=3")] == [
        63, 137, 4.9, -5.7, -1.7, 1536, 2.13, 3]


def test_missing_files_keys_and_figures_are_reported(tree):
    assert "no such file" in check(tree, "0.578<!-- from: gone.json#dev.average -->")[0]
    assert "no 'avg'" in check(tree, "0.578<!-- from: r.json#dev.avg -->")[0]
    assert "not a number" in check(tree, "0.578<!-- from: r.json#dev -->")[0]
    assert "only 1 figures" in check(tree, "0.578<!-- from: r.json#dev.{average,sst} -->")[0]
    assert "without a file" in check(tree, "0.578<!-- from: #dev.average -->")[0]
    assert "malformed" in check(tree, "0.578<!-- from r.json#dev.average -->")[0]
    assert "not simple arithmetic" in check(tree, "0.578<!-- from: pow(r.json#dev.average, 1) -->")[0]
    assert "names one value" in check(tree, "0.80<!-- from: r.json#seeds.*.test * 1 -->")[0]


def test_derived_values(tree):
    assert check(tree, "mean 0.8075<!-- from: mean(r.json#seeds.*.test) -->, 0.7775-0.8375<!-- from: "
                       "min(#seeds.*.test); max(#seeds.*.test) -->; first 0.778<!-- from: mean(#seeds.0:1.test) -->, "
                       "60.0 points<!-- from: 100 * (#seeds.-1.test - #seeds.0.test) + 54 -->") == []
    assert check(tree, "63<!-- from: r.json#wall_s - 81.4 -->-137<!-- from: #mem / 19.2 -->") == []
    assert check(tree, "0.578 0.297<!-- from: r.json#dev.{average,sst} -->") == []
    assert check(tree, "4.97 nats<!-- from: log(r.json#wall_s) -->") == []


def test_a_table_copied_from_a_report_table(tree):
    table = "| method | dev avg | % of full |\n|---|---|---|\n| **head-only** | 0.367 | 60.3% |\n"
    assert check(tree, "<!-- table: table.md -->\n" + table) == []
    assert check(tree, "<!-- table: table.md -->\n" + table.replace("60.3%", "61.3%")) == [
        "head-only / % of full: the doc says '61.3%', table.md '60.3%'"]
    assert "not in table.md" in check(tree, "<!-- table: table.md -->\n" + table.replace("head-only", "full-ft"))[0]
    assert "not in table.md" in check(tree, "<!-- table: table.md -->\n" + table.replace("dev avg", "dev"))[0]
    assert "no such file" in check(tree, "<!-- table: gone.md -->\n" + table)[0]
    assert check(tree, "0.608 (100%)<!-- from: table.md#[full][dev avg] #[full][% of full] -->") == []


def test_code_is_not_read(tree):
    assert check(tree, "`0.9<!-- from: r.json#dev.average -->` and\n```\n<!-- table: gone.md -->\n```\n") == []
    assert check(tree, "0.578<!-- from: r.json#dev.average --> (`--lr 3e-3`)") == []
    assert "only 0 figures" in check(tree, "`0.578`<!-- from: r.json#dev.average -->")[0]


def test_a_file_git_does_not_track_is_reported(tree):
    problems, _ = check_text("0.578<!-- from: r.json#dev.average -->", tree / "README.md", tracked=set())
    assert len(problems) == 1 and "not committed" in problems[0].what
