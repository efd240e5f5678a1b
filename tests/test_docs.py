"""The README as a user reads it: its configuration table is the dataclass's, its test command is CI's, and it
speaks of the project only."""
import os
import re
from dataclasses import MISSING, fields

import train_gpt as tg
from conftest import REPO

README = os.path.join(REPO, "README.md")
ROW = re.compile(r"^\| (`[A-Z0-9_]+`(?: / `[A-Z0-9_]+`)*) \| ([^|]*) \|")


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def table_defaults() -> dict[str, str]:
    """Variable -> the default the README's table gives it ("a / b" cells split over "A / B" rows)."""
    out = {}
    for line in readme().splitlines():
        match = ROW.match(line)
        if not match:
            continue
        names = [n.strip("`") for n in match.group(1).split(" / ")]
        values = [v.strip().strip("`") for v in match.group(2).split(" / ")]
        for i, name in enumerate(names):
            out[name] = values[i] if len(values) == len(names) else match.group(2).strip()
    return out


def same_default(shown: str, value) -> bool:
    if isinstance(value, bool):
        return shown in (str(int(value)), str(value).lower())
    if isinstance(value, (int, float)):
        try:
            return float(shown.replace(",", "")) == float(value)
        except ValueError:
            return False
    return shown == value or (value == "" and shown in ("", "(none)", "(empty)", '""'))


def test_the_configuration_table_lists_every_setting_with_its_default():
    shown = table_defaults()
    missing = [f.name.upper() for f in fields(tg.Hyperparameters) if f.name.upper() not in shown]
    assert missing == [], f"README's table lacks {missing}"
    wrong = [(f.name.upper(), shown[f.name.upper()], f.default) for f in fields(tg.Hyperparameters)
             if f.default is not MISSING and not same_default(shown[f.name.upper()], f.default)]
    assert wrong == [], f"README's table shows other defaults than the dataclass: {wrong}"
    unknown = sorted(set(shown) - {f.name.upper() for f in fields(tg.Hyperparameters)} - {"PRESET"})
    assert unknown == [], f"README's table lists variables the script does not read: {unknown}"


def test_the_test_command_is_what_ci_runs():
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    command = re.search(r"(python3 -m pytest[^`\n]*)", readme()).group(1).strip()
    assert command in ci


def test_the_readme_speaks_of_the_project_only():
    text = readme()
    assert len(text.encode()) <= 25_000, f"README.md is {len(text.encode()):,} bytes: dated results go to RESULTS.md"
    for pattern in (r"\.\./shared", r"nvidia-h\d", r"\bissue \d", r"\bsession\b"):
        assert not re.search(pattern, text, re.I), pattern


def test_the_readme_names_the_artifact_file_the_script_writes():
    assert f"`{tg.ARTIFACT_NAME}`" in readme()


def test_the_script_docstring_lists_its_sections_in_the_order_they_stand():
    with open(os.path.join(REPO, "train_gpt.py"), encoding="utf-8") as f:
        source = f.read()
    headers = [m.group(1).strip().lower() for m in re.finditer(r"^# -{20,}\n# ([^:,\n]+)", source, re.M)]
    listed = re.sub(r"\([^)]*\)", "", tg.__doc__.split("Sections, in the order a run uses them:")[1])
    names = [" ".join(part.split()).rstrip(" .") for part in listed.split(",")]
    assert names == headers
