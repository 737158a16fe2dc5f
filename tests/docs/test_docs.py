"""The README and docs/ say only what is true of the product: real commands and options, links that
resolve, every spec field documented, no development diary. Fast: no Ray is started."""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
JOB_SPEC_DOC = DOCS / "job-spec.md"
README_MAX_LINES = 200
DIARY = re.compile(r"(?i)session [0-9]|zen [0-9]")
CONTROL_OPERATORS = {"&&", "||", ";", "|", "&"}
# The heading in docs/job-spec.md that starts the training spec's part; the job spec's part comes before it.
TRAIN_PART_HEADING = re.compile(r"^## Training spec\b", re.MULTILINE)


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of each fenced code block."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```(.*)$", line)
        if fence and language is None:
            language, start, lines = fence.group(1).strip().lower(), number + 1, []
        elif fence and not fence.group(1).strip():
            blocks.append((language, start, lines))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def shell_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command line) of each command in the file's bash blocks, continuations joined."""
    commands = []
    for language, start, lines in fenced_blocks(path.read_text()):
        if language not in ("bash", "sh", "shell", "console"):
            continue
        pending, pending_start = "", 0
        for offset, line in enumerate(lines):
            if not pending:
                pending_start = start + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append((pending_start, command))
    return commands


@functools.cache
def cli_options() -> dict[str, set[str]]:
    """The Typer app's subcommands (a group's as "group sub"), each with every option word it accepts."""
    import typer

    from jobs.cli import app

    options = {}

    def collect(group: object, prefix: str) -> None:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):  # a group of subcommands
                collect(command, f"{prefix}{name} ")
                continue
            words = {"--help"}
            for param in command.params:
                words.update(word for word in [*param.opts, *param.secondary_opts] if word.startswith("-"))
            options[prefix + name] = words

    collect(typer.main.get_command(app), "")
    return options


def sed_label_invocations(command: str) -> list[list[str]]:
    """The words after `sed-label` of each simple command in a shell line that runs sed-label."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    segments, current = [], []
    for word in words:
        if word in CONTROL_OPERATORS:
            segments.append(current)
            current = []
        else:
            current.append(word)
    segments.append(current)
    invocations = []
    for segment in segments:
        while segment and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", segment[0]):  # VAR=value before a command
            segment = segment[1:]
        if segment and Path(segment[0]).name == "sed-label":
            invocations.append(segment[1:])
    return invocations


def unknown_words(arguments: list[str]) -> list[str]:
    """What in one sed-label invocation is not a subcommand or not one of its options."""
    commands = cli_options()
    if not arguments:
        return ["(no subcommand)"]
    if arguments[0] == "--help":
        return []
    subcommand, rest = arguments[0], arguments[1:]
    if subcommand not in commands and rest and f"{subcommand} {rest[0]}" in commands:  # a group's command
        subcommand, rest = f"{subcommand} {rest[0]}", rest[1:]
    if subcommand not in commands:
        return [subcommand]
    return [word for word in rest if word.startswith("--") and word.split("=", 1)[0] not in commands[subcommand]]


def test_readme_is_short_and_no_document_is_a_diary():
    lines = README.read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES} and move detail to docs/"
    found = [
        f"{relative(path)}:{number}: {line.strip()}"
        for path in documents()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if DIARY.search(line)
    ]
    assert not found, "history belongs in git, not in the docs (no 'session N', no 'Zen N'):\n" + "\n".join(found)


def test_every_documented_command_is_a_real_subcommand_with_real_options():
    problems, checked = [], 0
    for path in documents():
        for number, command in shell_commands(path):
            try:
                invocations = sed_label_invocations(command)
            except ValueError as exc:  # unbalanced quotes
                problems.append(f"{relative(path)}:{number}: cannot parse {command!r}: {exc}")
                continue
            for arguments in invocations:
                checked += 1
                for word in unknown_words(arguments):
                    problems.append(f"{relative(path)}:{number}: unknown {word!r} in: {command}")
    assert not problems, "commands in the docs that sed-label does not have:\n" + "\n".join(problems)
    assert checked >= 10, f"only {checked} sed-label commands found in bash blocks: is the parsing broken?"


def test_the_command_check_catches_unknown_subcommands_and_options():
    assert unknown_words(["run", "jobs/demo.yaml", "--overwrite", "--log-level", "debug"]) == []
    assert unknown_words(["run", "jobs/demo.yaml", "--no-such-option"]) == ["--no-such-option"]
    assert unknown_words(["relabel", "jobs/demo.yaml"]) == ["relabel"]
    assert sed_label_invocations("python3 -m venv .venv && .venv/bin/sed-label run jobs/demo.yaml # ok") == [["run", "jobs/demo.yaml"]]
    assert sed_label_invocations("pip install sed-label") == []


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of each inline Markdown link outside code."""
    links = []
    inside_fence = False
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(r"^\s*```", line):
            inside_fence = not inside_fence
            continue
        if inside_fence:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        links += [(number, match.group(1)) for match in re.finditer(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)]
    return links


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    anchors, seen = set(), {}
    inside_fence = False
    for line in path.read_text().splitlines():
        if re.match(r"^\s*```", line):
            inside_fence = not inside_fence
            continue
        heading = None if inside_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_every_relative_link_resolves():
    problems = []
    for path in documents():
        for number, target in markdown_links(path.read_text()):
            if re.match(r"^(https?:|mailto:)", target) or target.startswith("#"):
                continue
            file_part, _, anchor = target.partition("#")
            destination = (path.parent / file_part).resolve()
            if not destination.exists():
                problems.append(f"{relative(path)}:{number}: {target} -> no such file {destination}")
            elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination):
                problems.append(f"{relative(path)}:{number}: {target} -> no heading '#{anchor}' in {relative(destination)}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_docs_link_every_docs_page_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in markdown_links(README.read_text())}
    missing = [relative(page) for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not missing, f"README.md links no page of: {missing}"


def schema_fields(schema: dict) -> list[str]:
    """Every leaf field of a JSON Schema as a dotted path (`input.url`), through `$ref`s and `anyOf`s."""

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            pointer = node["$ref"]
            assert pointer.startswith("#/"), f"only local $refs are supported, got {pointer}"
            node = schema
            for part in pointer[2:].split("/"):
                node = node[part]
        return node

    def objects(node: dict) -> list[dict]:
        """The object schemas with properties that a field may hold."""
        node = resolve(node)
        found = [node] if node.get("properties") else []
        for key in ("anyOf", "oneOf", "allOf"):
            for option in node.get(key, []):
                found += objects(option)
        return found

    def also_a_value(node: dict) -> bool:
        """A field that is an object in one alternative and a plain value in another (not null)."""
        node = resolve(node)
        options = [resolve(option) for option in node.get("anyOf", node.get("oneOf", []))]
        return any(not option.get("properties") and option.get("type") not in (None, "null") for option in options)

    def walk(node: dict, prefix: str) -> list[str]:
        paths = []
        for name, field in node["properties"].items():
            sections = objects(field)
            if sections:
                for section in sections:
                    paths += walk(section, f"{prefix}{name}.")
            if not sections or also_a_value(field):
                paths.append(f"{prefix}{name}")
        return paths

    return sorted(set(walk(resolve(schema), "")))


def spec_doc_parts() -> dict[str, str]:
    """docs/job-spec.md cut in its job spec part and its training spec part."""
    text = JOB_SPEC_DOC.read_text()
    heading = TRAIN_PART_HEADING.search(text)
    assert heading, f"{relative(JOB_SPEC_DOC)} needs a '## Training spec' heading before the training spec's fields"
    return {"job": text[: heading.start()], "train": text[heading.start() :]}


def documented_rows(text: str) -> set[str]:
    """The dotted names in backticks that start a table row."""
    return set(re.findall(r"^\|\s*`([A-Za-z_][\w.]*)`\s*\|", text, re.MULTILINE))


SCHEMAS = {"job": REPO / "schemas" / "job.schema.json", "train": REPO / "schemas" / "train.schema.json"}


@pytest.mark.parametrize("part", sorted(SCHEMAS))
def test_the_spec_doc_lists_every_schema_field(part):
    fields = schema_fields(json.loads(SCHEMAS[part].read_text()))
    assert "version" in fields and len(fields) > 10, fields  # the walk reached the sections
    rows = documented_rows(spec_doc_parts()[part])
    missing = [field for field in fields if field not in rows]
    assert not missing, (
        f"{relative(JOB_SPEC_DOC)} has no table row for these fields of {relative(SCHEMAS[part])} "
        f"(add a row whose first cell is the field in backticks, e.g. `{missing[0]}`): {missing}"
    )
    stale = sorted(rows - set(fields))
    assert not stale, f"{relative(JOB_SPEC_DOC)} documents fields that {relative(SCHEMAS[part])} does not have: {stale}"


def test_the_schema_walk_follows_refs_and_optional_sections():
    schema = {
        "$defs": {
            "Inner": {"type": "object", "properties": {"a": {"type": "integer"}, "deep": {"$ref": "#/$defs/Deep"}}},
            "Deep": {"type": "object", "properties": {"b": {"type": "string"}}},
        },
        "properties": {
            "section": {"anyOf": [{"$ref": "#/$defs/Inner"}, {"type": "null"}]},
            "flat": {"type": "object"},
            "either": {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/Inner"}]},
        },
    }
    assert schema_fields(schema) == ["either", "either.a", "either.deep.b", "flat", "section.a", "section.deep.b"]
