"""LoRA adapters by name (handler.adapters, handler.engine.lora's gate), on real folders: which
names may be one, nothing opened outside the folder (Python's audit hook sees every open), the
checks of a copied adapter and why each refuses, the listing, a Hub cache's layout, and one load
for many requests at once (a fake of vLLM's serving models)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from handler import adapters
from handler.adapters import CONFIG, Folder, choose, hub_name, listing, name_problem, prepare
from handler.engine.lora import Adapters
from handler.errors import InvalidRequest, NotFound
from handler.settings import LORA_DIR_DEFAULT, SettingsError, load_settings

BASE = "/models/smollm2"
BASES = adapters.base_names("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", BASE)


def make_adapter(folder: Path, base: str = BASE, rank: int = 8, **config: Any) -> Path:
    folder.mkdir(parents=True)
    whole = {"peft_type": "LORA", "base_model_name_or_path": base, "r": rank, **config}
    (folder / CONFIG).write_text(json.dumps({k: v for k, v in whole.items() if v is not None}))
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": np.ones((rank, 16), np.float32),
        "base_model.model.layers.0.q_proj.lora_B.weight": np.zeros((16, rank), np.float32),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sql", "sql-v2", "my_adapter.1", "A" * 128, "a..b"])
def test_folder_names_may_be_adapters(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    "name", ["../x", "..", ".", "a/b", "/abs/path", "a\x00b", "-x", ".hidden", "a b", "A" * 129, ""]
)
def test_other_names_cannot_be(name: str) -> None:
    assert name_problem(name) == (
        "a LoRA adapter's name is a folder name in LORA_DIR: letters, digits, '.', '_', '-', "
        "at most 128 characters"
    )


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("org/repo", ("org/repo", ".")),
        ("org/repo/sql", ("org/repo", "sql")),
        ("org/repo/a/b", ("org/repo", "a/b")),
        ("org/repo/../x", None),
        ("org/repo/", None),
        ("org/repository", None),
        ("other/repo", None),
        ("sql", None),
    ],
)
def test_hub_names_are_in_a_listed_repository(name: str, found: tuple[str, str] | None) -> None:
    assert hub_name(name, ("org/repo",)) == found


# --- the folder setting -------------------------------------------------------------------------


def test_lora_dir_is_used_when_it_exists_and_blank_is_off(tmp_path: Path) -> None:
    assert choose(str(tmp_path)) == Folder(
        tmp_path, f"LoRA adapters by name from {tmp_path}, loaded on first use"
    )
    assert choose(" ") == Folder(None, "LORA_DIR is blank: no adapters from a folder")
    assert load_settings({"LORA_DIR": ""}).lora_dir == ""
    assert load_settings({}).lora_dir == LORA_DIR_DEFAULT


def test_the_default_folder_missing_is_off_another_missing_stops_the_worker(
    tmp_path: Path,
) -> None:
    assert choose(LORA_DIR_DEFAULT).path is None  # no network volume here
    with pytest.raises(SettingsError, match="LORA_DIR='/nowhere/loras': not a folder"):
        choose("/nowhere/loras")


# --- nothing outside the folder is read ---------------------------------------------------------

OPENED: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if OPENED is not None and event in ("open", "os.listdir", "os.scandir") and args:
        OPENED.append(os.fsdecode(args[0]) if isinstance(args[0], (str, bytes)) else str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only while asked


@pytest.fixture
def opened() -> Iterator[list[str]]:
    global OPENED
    OPENED = []
    try:
        yield OPENED
    finally:
        OPENED = None


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """LORA_DIR with one adapter, links that lead out, and a decoy adapter beside the folder
    that would load if it were read."""
    root = tmp_path / "loras"
    make_adapter(root / "good")
    decoy = make_adapter(tmp_path / "decoy")
    (root / "escape").symlink_to(decoy)
    (root / "half").mkdir()
    (root / "half" / CONFIG).symlink_to(decoy / CONFIG)
    (root / "half" / "adapter_model.safetensors").write_bytes(b"x")
    return root, decoy


@pytest.mark.parametrize("name", ["../decoy", "a/b", "..", "x\x00y", "/decoy", "../loras/good"])
def test_a_name_that_is_not_a_folder_name_is_refused_without_a_read(
    layout: tuple[Path, Path], tmp_path: Path, opened: list[str], name: str
) -> None:
    root, decoy = layout
    name = str(decoy) if name == "/decoy" else name
    with pytest.raises(NotFound) as refused:
        prepare(root, name, tmp_path / "copy", BASES, "SmolLM2-135M-Instruct")
    assert (refused.value.status, refused.value.param) == (404, "model")
    assert "a LoRA adapter's name is a folder name in LORA_DIR" in refused.value.message
    assert opened == [] and not (tmp_path / "copy").exists()


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("escape", "LoRA adapter `escape` is a link that leads out of its folder: refused."),
        (
            "half",
            "LoRA adapter `half`: adapter_config.json is a link that leads out of its folder: "
            "refused.",
        ),
    ],
)
def test_a_link_out_of_the_folder_is_refused_without_a_read(
    layout: tuple[Path, Path], tmp_path: Path, opened: list[str], name: str, says: str
) -> None:
    root, decoy = layout
    with pytest.raises(InvalidRequest) as refused:
        prepare(root, name, tmp_path / "copy", BASES, "SmolLM2-135M-Instruct")
    assert refused.value.message == says
    assert not [path for path in opened if path.startswith(str(decoy))], opened


def test_the_listing_reads_inside_the_folder_only(
    layout: tuple[Path, Path], opened: list[str]
) -> None:
    root, _decoy = layout
    assert listing(root, BASES, "SmolLM2-135M-Instruct") == ["good"]
    assert opened and all(path.startswith(str(root)) for path in opened), opened


# --- the checks, on the private copy --------------------------------------------------------------


def test_a_fitting_adapter_is_copied_and_later_changes_do_not_reach_the_copy(
    tmp_path: Path,
) -> None:
    root = tmp_path / "loras"
    source = make_adapter(root / "sql", base="huggingfacetb/smollm2-135m-instruct/")
    (source / "README.md").write_text("not copied")
    (source / "adapter_model.bin").write_bytes(b"not read: safetensors comes first")
    prepared = prepare(root, "sql", tmp_path / "copy", BASES, "SmolLM2-135M-Instruct")
    assert prepared is not None and prepared.path == tmp_path / "copy"
    assert sorted(p.name for p in prepared.path.iterdir()) == [CONFIG, "adapter_model.safetensors"]
    assert prepared.config["r"] == 8
    assert prepared.bytes == sum(p.stat().st_size for p in prepared.path.iterdir())
    (source / "adapter_model.safetensors").write_bytes(b"garbage")  # the folder changes later
    assert (prepared.path / "adapter_model.safetensors").read_bytes()[:8] != b"garbage"


def test_a_name_the_folder_does_not_have_is_none(tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    assert prepare(tmp_path / "loras", "nope", tmp_path / "c", BASES, "SmolLM2") is None


def _truncated(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])


def _garbage(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 300)


def _bad_json(folder: Path) -> None:
    (folder / CONFIG).write_text('{"peft_type": "LORA",')


def _no_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


def _no_config(folder: Path) -> None:
    (folder / CONFIG).unlink()


def _list_config(folder: Path) -> None:
    (folder / CONFIG).write_text("[]")


def _gap(folder: Path) -> None:
    header = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    raw = json.dumps(header).encode()
    blob = len(raw).to_bytes(8, "little") + raw + bytes(16)
    (folder / "adapter_model.safetensors").write_bytes(blob)


@pytest.mark.parametrize(
    ("change", "config", "says"),
    [
        (None, {"base_model_name_or_path": "meta-llama/Llama-3.1-8B"}, " was trained on "
         "'meta-llama/Llama-3.1-8B', not on the served model 'SmolLM2-135M-Instruct' (its "
         "served name, Hub id or path)."),
        (None, {"peft_type": None}, ': adapter_config.json has no peft_type (PEFT writes "LORA").'),
        (None, {"peft_type": "IA3"}, ": its peft_type is 'IA3'; only LORA adapters load."),
        (_bad_json, {}, ": adapter_config.json is not valid JSON (line 1 column 22)."),
        (_list_config, {}, ": adapter_config.json is not an object."),
        (_no_config, {}, " has no adapter_config.json."),
        (_no_weights, {}, " has no weights (adapter_model.safetensors, adapter_model.bin, "
         "adapter_model.pt)."),
        (_truncated, {}, ": adapter_model.safetensors is not a whole safetensors file (its "
         "tensors' bytes do not fill the file)."),
        (_garbage, {}, ": adapter_model.safetensors is not a whole safetensors file (its "
         "header's length is past the end of the file)."),
        (_gap, {}, ": adapter_model.safetensors is not a whole safetensors file (its tensors' "
         "byte ranges overlap or leave gaps)."),
    ],
)  # fmt: skip
def test_an_adapter_that_does_not_fit_is_refused_saying_why_and_leaves_no_copy(
    tmp_path: Path, change: Any, config: dict[str, Any], says: str
) -> None:
    root = tmp_path / "loras"
    folder = make_adapter(root / "bad", **config)
    if change is not None:
        change(folder)
    with pytest.raises(InvalidRequest) as refused:
        prepare(root, "bad", tmp_path / "copy", BASES, "SmolLM2-135M-Instruct")
    assert refused.value.message == "LoRA adapter `bad`" + says
    assert (refused.value.status, refused.value.param) == (400, "model")
    assert not (tmp_path / "copy").exists()


def test_an_adapter_that_names_no_base_model_is_taken(tmp_path: Path) -> None:
    make_adapter(tmp_path / "loras" / "any", base=None)  # type: ignore[arg-type]
    assert prepare(tmp_path / "loras", "any", tmp_path / "c", BASES, "SmolLM2") is not None


def test_the_served_models_folder_matches_by_its_real_path(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "alias").symlink_to(model)
    bases = adapters.base_names("SmolLM2", str(tmp_path / "alias"))
    make_adapter(tmp_path / "loras" / "a", base=str(model) + "/")
    assert prepare(tmp_path / "loras", "a", tmp_path / "c", bases, "SmolLM2") is not None


def test_the_listing_holds_the_adapters_that_fit_sorted(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    for name in ("b-sql", "a-chat"):
        make_adapter(root / name)
    make_adapter(root / "other", base="meta-llama/Llama-3.1-8B")
    make_adapter(root / "broken")
    _bad_json(root / "broken")
    (root / "not-a-folder.txt").write_text("x")
    (root / "bad name").mkdir()
    assert listing(root, BASES, "SmolLM2-135M-Instruct") == ["a-chat", "b-sql"]


def test_a_hub_snapshots_links_into_the_repository_cache_are_followed(tmp_path: Path) -> None:
    """huggingface_hub's cache: snapshots/<commit>/<file> links to ../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--org--adapters"
    made = make_adapter(tmp_path / "made")
    snapshot = repo / "snapshots" / "abc123" / "sql"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted(made.iterdir())):
        (repo / "blobs" / f"blob{i}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../../blobs") / f"blob{i}")
    prepared = adapters.prepare_subfolder(
        snapshot.parent, "sql", "org/adapters/sql", tmp_path / "c", BASES, "SmolLM2", repo
    )
    assert prepared is not None
    assert sorted(p.name for p in prepared.path.iterdir()) == [CONFIG, "adapter_model.safetensors"]
    (snapshot / CONFIG).unlink()
    (snapshot / CONFIG).symlink_to(made / CONFIG)  # out of the repository's cache folder
    with pytest.raises(InvalidRequest, match="is a link that leads out of its folder"):
        adapters.prepare_subfolder(
            snapshot.parent, "sql", "org/adapters/sql", tmp_path / "d", BASES, "SmolLM2", repo
        )


# --- the engine's gate: one load for many requests at once ------------------------------------


class Refused:
    """vLLM's ErrorResponse, as much of it as the gate reads."""

    def __init__(self, code: int) -> None:
        self.error = type("Info", (), {"code": code})()


class FakeModels:
    """vLLM's OpenAIServingModels, as much as the gate uses: records each resolve_lora."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.lora_requests: dict[str, object] = {}
        self.answers = answers or {}
        self.asked: list[str] = []

    def is_base_model(self, name: str) -> bool:
        return name == "SmolLM2"

    async def resolve_lora(self, name: str) -> object:
        self.asked.append(name)
        await asyncio.sleep(0.05)  # a load takes a while: others arrive meanwhile
        if name in self.answers:
            return self.answers[name]
        self.lora_requests[name] = object()
        return self.lora_requests[name]


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[Adapters, FakeModels]]:
    root = tmp_path / "loras"
    for name in ("sql", "broken", "gone"):
        make_adapter(root / name)
    settings = load_settings(
        {"LORA_DIR": str(root), "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "SmolLM2"}
    )
    found = Adapters.from_settings(settings)
    assert found is not None
    models = FakeModels({"broken": Refused(400), "gone": Refused(404)})
    found.bind(models, BASE, None)
    yield found, models
    found.close()


async def test_many_requests_for_a_new_adapter_load_it_once(
    gate: tuple[Adapters, FakeModels],
) -> None:
    adapters_, models = gate
    await asyncio.gather(*(adapters_.before({"model": "sql"}) for _ in range(8)))
    await adapters_.before({"model": "sql"})
    assert models.asked == ["sql"]


async def test_a_request_stopped_while_its_adapter_loads_leaves_the_load_to_finish(
    gate: tuple[Adapters, FakeModels],
) -> None:
    adapters_, models = gate
    first = asyncio.ensure_future(adapters_.before({"model": "sql"}))
    second = asyncio.ensure_future(adapters_.before({"model": "sql"}))
    while not models.asked:  # the load has begun
        await asyncio.sleep(0.001)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    await adapters_.before({"model": "sql"})
    assert (models.asked, list(models.lora_requests)) == (["sql"], ["sql"])


async def test_the_gate_lets_through_what_is_no_adapter_and_refuses_what_cannot_be(
    gate: tuple[Adapters, FakeModels],
) -> None:
    adapters_, models = gate
    for body in [None, {}, {"model": "SmolLM2"}, {"model": 3}, {"model": "unknown"}]:
        await adapters_.before(body)  # vLLM's app answers: the base model, or its own 404
    await adapters_.before({"model": "gone"})  # vLLM's resolvers found nothing: vLLM's 404
    with pytest.raises(NotFound, match="name is a folder name in LORA_DIR"):
        await adapters_.before({"model": "../sql"})
    with pytest.raises(InvalidRequest) as refused:
        await adapters_.before({"model": "broken"})
    assert refused.value.message == (
        "LoRA adapter `broken` could not be loaded: vLLM refused its weights for the served "
        "model (the worker's log has vLLM's reason)."
    )
    with pytest.raises(InvalidRequest) as again:
        await adapters_.before({"model": "broken"})
    assert again.value is refused.value  # refused at once: its files have not changed
    assert models.asked == ["gone", "broken"]
    config = adapters_.folder / "broken" / CONFIG  # type: ignore[operator]
    config.write_text(config.read_text() + " ")
    with pytest.raises(InvalidRequest):
        await adapters_.before({"model": "broken"})
    assert models.asked == ["gone", "broken", "broken"]  # changed: tried again


def test_without_a_folder_or_hub_repositories_nothing_is_loaded_at_run_time() -> None:
    assert Adapters.from_settings(load_settings({"LORA_DIR": ""})) is None
