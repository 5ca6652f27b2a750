"""Prompt files (GSM8K/MATH style), source validation, and the synthetic-task export tool."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import datasets
import pytest

from cropi_pl.tasks import FAMILIES, PromptFile, SyntheticTasks, generate_tasks, load_source
from cropi_pl.tasks.loading import extract_gold

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import export_tasks  # noqa: E402

GSM8K_ROWS = [
    {"question": "Ann has 3 apples and buys 4.", "answer": "3+4=7\n#### 7"},
    {"question": "A farm sells 1,000 eggs twice.", "answer": "1000*2=2000\n#### 2,000"},
    {"question": "Half of 5?", "answer": "5/2 = <<5/2=2.5>>2.5 #### 2.5"},
]
MATH_ROWS = [
    {
        "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.",
        "solution": "We get $\\boxed{\\frac{3}{4}}$.",
        "type": "Algebra",
        "uid": "m-1",
        "difficulty": 3,
    },
    {
        "problem": "Simplify $\\sqrt{8}$.",
        "solution": "First \\boxed{2\\sqrt{4}}, no: $\\boxed{2\\sqrt{2}}$.",
        "type": "Geometry",
        "uid": "m-2",
        "difficulty": 5,
    },
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_gsm8k_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    source = PromptFile(str(path), template="Question: {prompt}\nAnswer:", family="gsm8k")
    data = load_source(source)
    assert data["answer"] == ["7", "2000", "2.5"]
    assert data["prompt"] == [f"Question: {row['question']}\nAnswer:" for row in GSM8K_ROWS]
    assert data["id"] == ["gsm-0", "gsm-1", "gsm-2"]
    assert data["family"] == ["gsm8k"] * 3
    assert data["difficulty"] == [0, 0, 0]
    limited = PromptFile(str(path), limit=2).load()
    assert limited["answer"] == ["7", "2000"]


def test_math_parquet_and_json(tmp_path: Path) -> None:
    parquet = tmp_path / "math.parquet"
    datasets.Dataset.from_list(MATH_ROWS).to_parquet(str(parquet))
    as_json = tmp_path / "math.json"
    as_json.write_text(json.dumps(MATH_ROWS))
    for path in (parquet, as_json):
        source = PromptFile(
            str(path),
            prompt_field="problem",
            answer_field="solution",
            answer_format="boxed",
            id_field="uid",
            family_field="type",
            template="{prompt} ({type})",
        )
        data = load_source(source)
        assert data["answer"] == ["\\frac{3}{4}", "2\\sqrt{2}"], path
        assert data["id"] == ["m-1", "m-2"]
        assert data["family"] == ["Algebra", "Geometry"]
        assert data["difficulty"] == [3, 5]
        assert data["prompt"][0] == "Compute $\\frac{1}{2}+\\frac{1}{4}$. (Algebra)"


@pytest.mark.parametrize(
    ("text", "fmt", "gold"),
    [
        ("blah \\boxed{1} #### 2", "auto", "2"),  # auto: gsm8k first
        ("so \\boxed{\\frac{1}{2}}", "auto", "\\frac{1}{2}"),  # then boxed
        ("  42 ", "auto", "42"),  # then the text itself
        ("blah \\boxed{1} #### 2", "boxed", "1"),
        ("\\boxed{1} #### 2", "plain", "\\boxed{1} #### 2"),
        ("no marker", "gsm8k", None),
        ("   ", "auto", None),
        ("\\boxed{ #### 2", "auto", "2"),  # gsm8k marker wins before boxed
    ],
)
def test_extract_gold(text: str, fmt: str, gold: str | None) -> None:
    assert extract_gold(text, fmt) == gold


@pytest.mark.parametrize("fmt", ["auto", "boxed"])
def test_unclosed_boxed_gold_is_an_error_not_the_whole_text(fmt: str) -> None:
    with pytest.raises(ValueError, match=r"unclosed \\boxed\{"):
        extract_gold("so the answer is \\boxed{\\frac{1}{2}", fmt)


def test_errors_name_file_row_and_field(tmp_path: Path) -> None:
    rows = [*GSM8K_ROWS[:2], {"question": "q", "solution": "#### 1"}]
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(KeyError, match=r"broken\.jsonl row 3: missing field 'answer'"):
        PromptFile(str(path)).load()
    path = write_jsonl(tmp_path / "nomark.jsonl", [GSM8K_ROWS[0], {"question": "q", "answer": "7"}])
    with pytest.raises(ValueError, match=r"nomark\.jsonl row 2: no gsm8k answer"):
        PromptFile(str(path), answer_format="gsm8k").load()
    with pytest.raises(KeyError, match=r"row 1: template .* needs 'topic'"):
        PromptFile(str(path), template="{topic}: {prompt}").load()
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        PromptFile(str(tmp_path / "missing.jsonl")).load()
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        PromptFile(str(tmp_path / "data.csv")).load()
    with pytest.raises(ValueError, match="answer_format"):
        PromptFile(str(path), answer_format="latex")


def test_fingerprint_tracks_content_not_mtime(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    source = PromptFile(str(path))
    before = source.fingerprint()
    assert source.fingerprint() == before
    assert PromptFile(str(path), template="Q: {prompt}").fingerprint() != before
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace("#### 7", "#### 8"))  # same size, same mtime after utime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert source.fingerprint() != before
    assert source.load()["answer"][0] == "8"  # and no stale cached rows


def test_load_source_validation(tmp_path: Path) -> None:
    rows = [{**row, "key": "same"} for row in GSM8K_ROWS]
    path = write_jsonl(tmp_path / "dupes.jsonl", rows)
    with pytest.raises(ValueError, match="duplicate id 'same'"):
        load_source(PromptFile(str(path), id_field="key"))

    class NoFamily:
        def load(self) -> datasets.Dataset:
            return datasets.Dataset.from_list(
                [{"id": "a", "prompt": "p", "answer": "1", "difficulty": 1}]
            )

        def fingerprint(self) -> str:
            return "no-family"

    with pytest.raises(ValueError, match=r"NoFamily lacks columns \['family'\]"):
        load_source(NoFamily())
    synthetic = load_source(SyntheticTasks(families=["add"], difficulties=[1], num_per_cell=5))
    assert len(synthetic) == 5


def export(*args: str) -> tuple[int, str]:
    """``tools/export_tasks.py args`` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = export_tasks.main(list(args))
        except SystemExit as exit_:  # argparse's error exit
            code = exit_.code
    return code, err.getvalue()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_round_trip(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / "nested" / f"train{suffix}"
    code, stderr = export(
        "--split", "train", "--num-per-cell", "6", "--families", "add", "mul", "--out", str(out)
    )
    assert code == 0, stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left behind
    expected = generate_tasks(["add", "mul"], num_per_cell=6, split="train")
    loaded = load_source(
        PromptFile(
            str(out),
            prompt_field="prompt",
            answer_field="answer",
            answer_format="plain",
            id_field="id",
            family_field="family",
        )
    )
    assert loaded["prompt"] == expected["prompt"]
    assert loaded["answer"] == expected["answer"]
    assert loaded["id"] == expected["id"]
    assert loaded["family"] == expected["family"]
    assert loaded["difficulty"] == expected["difficulty"]
    assert set(loaded["family"]) == {"add", "mul"} and set(FAMILIES) > {"add", "mul"}


def test_export_rejects_bad_output(tmp_path: Path) -> None:
    code, stderr = export("--out", str(tmp_path / "tasks.csv"))
    assert code != 0 and "--out must end in" in stderr
    assert not (tmp_path / "tasks.csv").exists()


def test_one_prompt_source_definition() -> None:
    import cropi_pl.tasks.loading as loading
    import cropi_pl.tasks.source as source

    assert not hasattr(loading, "load_source")
    assert loading.PromptSource is source.PromptSource
    assert loading.REQUIRED_COLUMNS is source.REQUIRED_COLUMNS
    assert issubclass(PromptFile, source.PromptSource)
    assert issubclass(SyntheticTasks, source.PromptSource)


def test_extra_columns_are_kept_and_required_ones_converted(tmp_path: Path) -> None:
    rows = [
        {**row, "unit": unit, "tags": tags, "id": f"g{i}", "difficulty": f"Level {i + 2}"}
        for i, (row, unit, tags) in enumerate(
            zip(GSM8K_ROWS, ["apples", "", "cakes"], [["a"], [], ["b", "c"]], strict=True)
        )
    ]
    path = write_jsonl(tmp_path / "extra.jsonl", rows)
    data = load_source(PromptFile(str(path), template="Q: {prompt} ({unit})"))
    assert data.column_names[:5] == ["id", "prompt", "answer", "family", "difficulty"]
    assert data["unit"] == ["apples", "", "cakes"]
    assert data["tags"] == [["a"], [], ["b", "c"]]
    assert data["question"] == [row["question"] for row in GSM8K_ROWS]
    assert data["answer"] == ["7", "2000", "2.5"]  # the file's "answer" column became the gold
    assert data["id"] == ["extra-0", "extra-1", "extra-2"]  # no id_field: file column replaced
    assert data["difficulty"] == [2, 3, 4]  # "Level 2" ...
    assert data["prompt"][0] == f"Q: {GSM8K_ROWS[0]['question']} (apples)"


def test_math_parquet_difficulty_field_and_boxed_instruction(tmp_path: Path) -> None:
    rows = [
        {k: v for k, v in row.items() if k != "difficulty"}
        | {"level": f"Level {row['difficulty']}"}
        for row in MATH_ROWS
    ]
    path = tmp_path / "math.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    template = "{prompt} Put the final answer in \\boxed{{}}."
    data = load_source(
        PromptFile(
            str(path),
            prompt_field="problem",
            answer_field="solution",
            template=template,
            difficulty_field="level",
            id_field="uid",
        )
    )
    assert data["difficulty"] == [3, 5]
    assert data["level"] == ["Level 3", "Level 5"]
    assert data["solution"] == [row["solution"] for row in MATH_ROWS]
    assert data["prompt"][1] == "Simplify $\\sqrt{8}$. Put the final answer in \\boxed{}."
    with pytest.raises(KeyError, match=r"math\.parquet row 1: missing field 'rank'"):
        PromptFile(
            str(path), prompt_field="problem", answer_field="solution", difficulty_field="rank"
        ).load()
    bad = tmp_path / "bad_level.jsonl"
    write_jsonl(bad, [{"question": "q", "answer": "#### 1", "difficulty": "hard"}])
    with pytest.raises(ValueError, match=r"bad_level\.jsonl row 1: difficulty 'hard'"):
        PromptFile(str(bad)).load()


@pytest.mark.parametrize("template", ["{prompt} in \\boxed{}", "{0}: {prompt}", "{prompt} }"])
def test_template_with_stray_braces_is_refused_at_construction(template: str) -> None:
    with pytest.raises(ValueError, match=r"literal braces are written \{\{ and \}\}"):
        PromptFile("any.jsonl", template=template)


GOOD_LINE = b'{"question": "q", "answer": "#### 1"}\n'


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", r"empty\.jsonl: empty file \(no rows\)"),
        ("blank.json", b"\n  \n", r"blank\.json: empty file"),
        (
            "latin1.jsonl",
            GOOD_LINE * 2 + b'{"question": "caf\xe9"}\n',
            r"latin1\.jsonl line 3: not UTF-8",
        ),
        ("notjson.jsonl", GOOD_LINE + b"\n" + b"question: q\n", r"notjson\.jsonl line 3: not JSON"),
        ("list.jsonl", GOOD_LINE + b"[1, 2]\n", r"list\.jsonl line 2: not a JSON object"),
        ("array.json", b'[{"question": "q", "answer": "1"}, 7]', r"array\.json row 2: not a JSON"),
        (
            "unclosed.jsonl",
            GOOD_LINE + b'{"question": "q", "answer": "so \\\\boxed{\\\\frac{1}{2}"}\n',
            r"unclosed\.jsonl row 2: field 'answer': unclosed \\boxed\{",
        ),
    ],
)
def test_bad_data_files_name_file_and_row(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        PromptFile(str(path)).load()


def test_bad_rows_are_named(tmp_path: Path) -> None:
    path = tmp_path / "garbled.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"garbled\.jsonl line 2: not JSON"):
        PromptFile(str(path)).load()

    class EmptyPrompt(SyntheticTasks):
        def load(self) -> datasets.Dataset:
            data = super().load().to_list()
            data[2]["prompt"] = "  "
            return datasets.Dataset.from_list(data)

    source = EmptyPrompt(families=["add"], difficulties=[1], num_per_cell=4)
    with pytest.raises(ValueError, match=r"EmptyPrompt row 2 \(id 'add-1-.*'\): prompt must be"):
        load_source(source)

    class NoAnswer(SyntheticTasks):
        def load(self) -> datasets.Dataset:
            data = super().load().to_list()
            data[1]["answer"] = None
            return datasets.Dataset.from_list(data)

    with pytest.raises(ValueError, match=r"NoAnswer row 1 \(id .*\): answer is empty \(None\)"):
        load_source(NoAnswer(families=["add"], difficulties=[1], num_per_cell=4))


def test_prompt_file_and_user_source_from_yaml(tmp_path: Path) -> None:
    """The README's real-data YAML parses and instantiates through the real CLI parser."""
    from cropi_pl.cli import main

    path = write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    pool = {
        "class_path": "cropi_pl.tasks.loading.PromptFile",
        "init_args": {
            "path": str(path),
            "answer_format": "gsm8k",
            "template": "Question: {prompt}\nAnswer:",
        },
    }
    user = {"class_path": "tests.plugins.UserPrompts", "init_args": {"offset": 3}}
    cli = main(
        [
            "--config",
            str(REPO / "tests" / "configs" / "tiny_test.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.pool={json.dumps(pool)}",
            f"--data.init_args.eval_sets={json.dumps({'user': user})}",
        ],
        run=False,
    )
    dm = cli.datamodule
    assert type(dm.pool_source) is PromptFile and dm.pool_source.answer_format == "gsm8k"
    dm.setup("fit")
    assert dm.pool["answer"] == ["7", "2000", "2.5"]
    assert dm.eval_data["user"]["unit"] == ["", "apples", "", "apples"]
    assert dm.eval_data["user"]["prompt"][0] == "Q: 3+1\nA: "
