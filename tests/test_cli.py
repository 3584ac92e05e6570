"""The `dalle-mini-jax` command: generate, PNG metadata, grid, and clean errors."""

import json

import pytest
from PIL import Image

from dalle_mini_jax import cli
from tests.model_dirs import tiny_model_dir  # noqa: F401  (fixture)


def _run(args, capsys):
    try:
        code = cli.main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_pngs_with_metadata_and_grid(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    code, stdout, err = _run(["generate", "a red square", "a blue circle", "--model", str(tiny_model_dir),
                              "-n", "2", "--seed", "4", "--grid", "--out", str(out), "--top-k", "50",
                              "--guidance", "3", "--temperature", "0.9"], capsys)
    assert code == 0, err
    files = sorted(out.glob("*.png"))
    assert len(files) == 5  # 4 images + grid
    singles = [f for f in files if not f.name.startswith("grid")]
    img = Image.open(singles[0])
    assert img.text["prompt"] == "a red square"
    assert img.text["seed"] == "4"
    assert img.text["model"] == tiny_model_dir.name
    settings = json.loads(img.text["settings"])
    assert settings == {"temperature": 0.9, "top_k": 50, "top_p": None, "guidance": 3.0}
    grid = Image.open(out / "grid-seed4.png")
    side = img.size[0]
    assert grid.size == (2 * side, 2 * side)
    assert json.loads(grid.text["prompts"]) == ["a red square", "a blue circle"]
    assert str(singles[0]) in stdout


def test_generate_uses_the_models_generation_config(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    model_dir = tmp_path / "model"  # links to the shared fixture's files, plus our own config
    model_dir.mkdir()
    for entry in tiny_model_dir.iterdir():
        (model_dir / entry.name).symlink_to(entry)
    (model_dir / "generation_config.json").write_text('{"guidance": 3, "top_k": 16, "temperature": 0.9}')
    used = lambda png: json.loads(Image.open(png).text["settings"])  # noqa: E731
    code, _, err = _run(["generate", "a red square", "--model", str(model_dir), "-q",
                         "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    assert used(tmp_path / "a.png") == {"temperature": 0.9, "top_k": 16, "top_p": None, "guidance": 3.0}
    # Flags override the model's defaults; the PNG records what was used.
    code, _, err = _run(["generate", "a red square", "--model", str(model_dir), "-q", "--top-k", "0",
                         "--guidance", "2", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    assert used(tmp_path / "b.png") == {"temperature": 0.9, "top_k": None, "top_p": None, "guidance": 2.0}


def test_generate_help_names_the_model_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the model's generation_config.json, else 10" in text
    assert "else 50" in text


def test_single_png_path(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    target = tmp_path / "one.png"
    code, _, err = _run(["generate", "a red square", "--model", str(tiny_model_dir), "--out", str(target),
                         "-q"], capsys)
    assert code == 0, err
    assert Image.open(target).text["prompt"] == "a red square"


@pytest.mark.parametrize("args, message", [
    (["-n", "-1"], "must be >= 1"),
    (["-n", "two"], "positive integer"),
    (["--top-p", "1.5"], "(0, 1]"),
    (["--top-p", "0"], "(0, 1]"),
    (["--temperature", "0"], "must be > 0"),
    (["--dtype", "float8"], "invalid choice"),
    (["--model", "/no/such/dir"], "does not exist"),
    (["--guidance", "nan"], "finite"),
    (["--top-k", "2.5"], "positive integer"),
])
def test_bad_arguments_give_a_message_not_a_traceback(args, message, capsys):
    code, _, err = _run(["generate", "a prompt"] + args, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_empty_prompts(capsys):
    code, _, err = _run(["generate"], capsys)
    assert code == 2 and "PROMPT" in err
    code, _, err = _run(["generate", "  ", "--model", "."], capsys)
    assert code == 2 and "empty" in err


def test_missing_bundled_model_is_a_clean_error(monkeypatch, capsys, tmp_path):
    from dalle_mini_jax import pipeline

    monkeypatch.setattr(pipeline, "BUNDLED_MODEL_DIR", tmp_path / "none")
    code, _, err = _run(["generate", "a prompt"], capsys)
    assert code == 2 and "no bundled model" in err and "Traceback" not in err


def test_damaged_model_dir_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = _run(["generate", "a prompt", "--model", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err


def test_register_adds_a_subcommand(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    seen = {}
    cli.register("hello", "say hello", lambda p: p.add_argument("name"),
                 lambda a: seen.update(name=a.name))
    assert cli.main(["hello", "world"]) == 0
    assert seen == {"name": "world"}
