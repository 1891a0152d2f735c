"""What the page says runs the model: the line under the composer once the model is ready.

The model's name is never a filesystem path; the precision is the engine's label (or, failing
that, its dtype and device), and a model server is named as such.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from app.model_slot import ModelSlot, ModelState, display_name
from app.services import Services
from app.ui import regions
from app.ui.page import Page, runs_on_html
from mipha_core import RemoteServer, load_remote_engine


def page_of(services: Services) -> Page:
    """The page's regions, built as `build_app` builds them, around `services.model`."""
    settings = services.settings
    with gr.Blocks():
        state, sidebar = regions.hidden_state(), regions.sidebar(settings)
        chat = regions.chat("", status_visible=False)
        composer = regions.composer(settings, runs_on="")
        params = regions.generation_settings(settings)
    return Page(sidebar, params, chat, composer, state, services.model, settings)


def line_update(services: Services) -> dict:
    page = page_of(services)
    return page.status()[page.composer.runs_on]


def test_the_ready_tiny_model_is_named_with_its_precision_and_the_banner_hides(app_services):
    page = page_of(app_services)
    updates = page.status()
    assert updates[page.composer.runs_on]["visible"] is True
    assert updates[page.composer.runs_on]["value"] == '<p class="runs-on">Model: tiny demo model · fp32 · CPU</p>'
    assert updates[page.chat.status]["visible"] is False
    status = app_services.model.status()
    assert status.runs_on == status.message == "tiny demo model · fp32 · CPU"


def test_while_loading_and_after_a_failure_there_is_no_line(app_services):
    slot = ModelSlot("zhumj34/Mipha-3B")
    loading = replace(app_services, model=slot)
    assert slot.status().runs_on is None
    assert line_update(loading) == {"__type__": "update", "value": "", "visible": False}

    def fail():
        raise MemoryError("out of memory")

    slot.load_in_background(fail).join(timeout=10)
    assert slot.status().state is ModelState.FAILED and slot.status().runs_on is None
    assert line_update(loading)["visible"] is False


def test_a_local_folder_is_named_by_its_folder_never_its_path(app_services, tmp_path):
    folder = tmp_path / "models" / "Mipha-3B"
    folder.mkdir(parents=True)
    engine = SimpleNamespace(model_id=str(folder), label=f"{folder} · int8 · CPU (llama.cpp)",
                             precision_label="int8 · CPU (llama.cpp)")
    status = ModelSlot.ready(engine).status()  # type: ignore[arg-type]
    assert status.runs_on == "Mipha-3B · int8 · CPU (llama.cpp)"
    assert str(tmp_path) not in status.message  # the banner's text reaches the browser too
    shown = line_update(replace(app_services, model=ModelSlot.ready(engine)))  # type: ignore[arg-type]
    assert shown["value"] == '<p class="runs-on">Model: Mipha-3B · int8 · CPU (llama.cpp)</p>'


@pytest.mark.parametrize("model, name", [
    ("tiny", "tiny demo model"),
    ("zhumj34/Mipha-3B", "zhumj34/Mipha-3B"),
    ("/srv/models/Mipha-3B/", "Mipha-3B"),
    ("~/models/Mipha-3B", "Mipha-3B"),
    ("./Mipha-3B", "Mipha-3B"),
])
def test_display_names(model, name):
    assert display_name(model) == name


def test_an_engine_built_without_a_precision_label_shows_its_dtype_and_device(app_tiny_engine):
    engine = copy.copy(app_tiny_engine)
    engine.precision_label = None
    assert ModelSlot.ready(engine).status().runs_on == "tiny demo model · float32 · CPU"


def test_a_model_server_is_named_as_the_source_of_the_replies(tmp_path):
    engine = load_remote_engine(RemoteServer(url="http://gpu.internal:8000/v1"), model="tiny", data_dir=tmp_path)
    status = ModelSlot.ready(engine).status()
    assert status.runs_on == "tiny demo model · replies come from the model server"
    assert "gpu.internal" not in status.message  # the server's address stays in the log


def test_the_line_is_escaped():
    status = SimpleNamespace(runs_on="a/<b>model</b> · int8 · CPU (llama.cpp)")
    assert runs_on_html(status) == (  # type: ignore[arg-type]
        '<p class="runs-on">Model: a/&lt;b&gt;model&lt;/b&gt; · int8 · CPU (llama.cpp)</p>')


def test_a_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("checkpoints/Mipha-3B").mkdir(parents=True)
    assert display_name("checkpoints/Mipha-3B") == "Mipha-3B"
