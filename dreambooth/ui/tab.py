"""The Dreambooth tab as gradio Blocks, built from a Host (WebUI or standalone).

Every config widget is created from its field's metadata and kept in a dict keyed by field
name; handlers receive the values in the order of that dict and turn them back into a dict, so
no value is ever identified by its position.
"""
from __future__ import annotations

import time

import gradio as gr

from ..host.interface import Host
from ..host.parts import PART_FIELDS
from ..host.runner import RunManager
from . import compat, fields, render
from .actions import TabActions

ELEM = "dreambooth"  # the one stem of every elem_id and CSS class
POLL_S = 0.5


def _widget(spec: fields.WidgetSpec, value, choices: list[str] | None = None):
    common = dict(label=spec.label, info=spec.help, elem_id=f"{ELEM}_{_id(spec.key)}")
    if choices is not None:
        return gr.Dropdown(choices=choices, value=value or None, allow_custom_value=True,
                           **common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), value=value, **common)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if spec.kind == "int" else None,
                         minimum=spec.minimum, maximum=spec.maximum, **common)
    return gr.Textbox(value=value, lines=1, **common)


def _id(key: str) -> str:
    return key.replace("[", "_").replace("].", "_").replace(".", "_")


class Tab:
    """Builds the components, keeps them by key, wires the buttons to TabActions."""

    def __init__(self, host: Host, manager: RunManager | None = None, banner: str = "") -> None:
        self.actions = TabActions(host, manager)
        self.host, self.banner = host, banner
        self.parts: dict[str, str] | None = None  # the host's part files, name -> path
        self.widgets: dict[str, gr.components.Component] = {}
        self.concept_boxes: list = []

    # -- layout ----------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        compat.allow_paths([self.host.paths.work_dir, self.host.paths.checkpoints_dir])
        self.parts = self.actions.part_files()
        values, count = fields.config_to_values(self.actions.default_config())
        with gr.Blocks(analytics_enabled=False) as blocks:
            gr.HTML(self.banner, elem_id=f"{ELEM}_banner", visible=bool(self.banner))
            self.message = gr.HTML("", elem_id=f"{ELEM}_message")
            with gr.Row(elem_id=f"{ELEM}_root"):
                with gr.Column(scale=3):
                    self.count = gr.State(count)
                    with gr.Tabs(elem_id=f"{ELEM}_sections"):
                        self._model_section(values)
                        self._concepts_section(values, count)
                        for name in ("Parameters", "Saving", "Other"):
                            self._section(name, values)
                with gr.Column(scale=2):
                    self._progress_panel()
            self._wire()
        self.blocks = blocks
        return blocks

    def _model_section(self, values: dict) -> None:
        with gr.Tab("Model", elem_id=f"{ELEM}_tab_model"):
            with gr.Row():
                self.model_select = gr.Dropdown(choices=self.actions.model_names(),
                                                label="Saved models", elem_id=f"{ELEM}_models",
                                                allow_custom_value=True)
                self.models_refresh_btn = gr.Button("\U0001f504", elem_id=f"{ELEM}_models_refresh")
                self.load_btn = gr.Button("Load settings", elem_id=f"{ELEM}_load")
            self._section("Model", values, with_tab=False)
            with gr.Row():
                self.refresh_btn = gr.Button("\U0001f504 Refresh checkpoints",
                                             elem_id=f"{ELEM}_refresh")
                self.create_btn = gr.Button("Create model", elem_id=f"{ELEM}_create")
                self.save_btn = gr.Button("Save settings", elem_id=f"{ELEM}_save_settings")

    def _section(self, name: str, values: dict, with_tab: bool = True) -> None:
        specs = fields.config_specs().get(name, [])
        if not specs:
            return
        tab = gr.Tab(name, elem_id=f"{ELEM}_tab_{name.lower()}") if with_tab else None
        if tab is not None:
            tab.__enter__()
        for spec in (s for s in specs if not s.advanced):
            self._add(spec, values[spec.key])
        advanced = [s for s in specs if s.advanced]
        if advanced:
            with gr.Accordion("Advanced", open=False, elem_id=f"{ELEM}_adv_{name.lower()}"):
                for spec in advanced:
                    self._add(spec, values[spec.key])
        if tab is not None:
            tab.__exit__(None, None, None)

    def _add(self, spec: fields.WidgetSpec, value) -> None:
        choices = self.actions.checkpoint_titles() if spec.key == "source_checkpoint" else None
        if spec.key == "model_type":
            spec = fields.host_model_types(spec, self.actions.host)
        if spec.key in PART_FIELDS and self.parts is not None:  # the host's list, by name
            choices = sorted(self.parts)
            value = self.actions.part_value(spec.key, value, self.parts, guess=True)
        self.widgets[spec.key] = _widget(spec, value, choices)

    @property
    def part_widgets(self) -> list:
        """The part fields' dropdowns (none where the host lists no part files)."""
        return [] if self.parts is None else [self.widgets[k] for k in PART_FIELDS]

    def _concepts_section(self, values: dict, count: int) -> None:
        with gr.Tab("Concepts", elem_id=f"{ELEM}_tab_concepts"):
            for i in range(fields.MAX_CONCEPTS):
                with gr.Group(visible=i < count, elem_id=f"{ELEM}_concept_{i}") as box:
                    gr.Markdown(f"**Concept {i + 1}**")
                    specs = fields.concept_specs(i)
                    for spec in (s for s in specs if not s.advanced):
                        self._add(spec, values[spec.key])
                    for spec in (s for s in specs if s.advanced):
                        self._add(spec, values[spec.key])
                self.concept_boxes.append(box)
            with gr.Row():
                self.add_concept = gr.Button("Add concept", elem_id=f"{ELEM}_add_concept")
                self.remove_concept = gr.Button("Remove last concept",
                                                elem_id=f"{ELEM}_remove_concept")

    def _progress_panel(self) -> None:
        with gr.Row():
            self.train_btn = gr.Button("Train", variant="primary", elem_id=f"{ELEM}_train")
            self.save_now_btn = gr.Button("Save now", elem_id=f"{ELEM}_save_now")
            self.sample_now_btn = gr.Button("Sample now", elem_id=f"{ELEM}_sample_now")
            self.cancel_btn = gr.Button("Cancel", variant="stop", elem_id=f"{ELEM}_cancel")
            self.stop_now_btn = gr.Button("Stop now", elem_id=f"{ELEM}_stop_now")
        self.progress = gr.HTML(render.progress_html(self.actions.manager.status()),
                                elem_id=f"{ELEM}_progress")
        self.result = gr.HTML("", elem_id=f"{ELEM}_result")
        self.final_path = gr.Textbox(label="Trained checkpoint", interactive=False,
                                     elem_id=f"{ELEM}_final_path")
        self.saved_list = gr.Dropdown(choices=[], value=None, label="Checkpoints of this run",
                                      interactive=True, elem_id=f"{ELEM}_saved_list")
        self.use_btn = gr.Button("Use in txt2img", visible=False, elem_id=f"{ELEM}_use_txt2img")
        self.gallery = compat.gallery(label="Newest samples", elem_id=f"{ELEM}_samples")
        self.loss = gr.HTML(render.loss_svg([]), elem_id=f"{ELEM}_loss")
        self.log = gr.Textbox(label="Messages", lines=4, interactive=False,
                              elem_id=f"{ELEM}_log")
        self.status_btn = gr.Button("Show progress", elem_id=f"{ELEM}_status")

    # -- events ----------------------------------------------------------------------------------
    @property
    def inputs(self) -> list:
        return [self.count] + list(self.widgets.values())

    def _values(self, args: tuple) -> tuple[int, dict]:
        count, rest = int(args[0] or 1), args[1:]
        return count, dict(zip(self.widgets.keys(), rest))

    def _wire(self) -> None:
        status_outputs = [self.progress, self.result, self.gallery, self.loss, self.final_path,
                          self.log, self.saved_list, self.message, self.model_select,
                          self.use_btn]
        stream = dict(fn=self.stream, inputs=None, outputs=status_outputs,
                      show_progress="hidden", **compat.event_kwargs(streaming=True))
        self.train_btn.click(self.on_train, self.inputs, [self.message]).then(**stream)
        self.status_btn.click(**stream)
        self.cancel_btn.click(self.actions.cancel, None, [self.message], queue=False)
        self.stop_now_btn.click(self.actions.stop_now, None, [self.message], queue=False)
        self.save_now_btn.click(self.actions.save_now, None, [self.message], queue=False)
        self.sample_now_btn.click(self.actions.sample_now, None, [self.message], queue=False)
        self.use_btn.click(self.actions.use_in_txt2img, [self.saved_list], [self.message])
        self.models_refresh_btn.click(lambda: gr.update(choices=self.actions.model_names()),
                                      None, [self.model_select], queue=False)
        self.save_btn.click(self.on_save, self.inputs, [self.message, self.model_select])
        self.create_btn.click(self.on_create, self.inputs, [self.message, self.model_select])
        self.load_btn.click(self.on_load, [self.model_select],
                            [self.message, self.count] + self.concept_boxes
                            + list(self.widgets.values()))
        source = self.widgets["source_checkpoint"]
        self.refresh_btn.click(self.on_refresh, None, [source] + self.part_widgets,
                               queue=False)
        source.change(self.on_source, [source, self.widgets["model_type"]],
                      [self.widgets["model_type"], self.message])
        self.add_concept.click(lambda n: self.on_count(n + 1), [self.count],
                               [self.count] + self.concept_boxes, queue=False)
        self.remove_concept.click(lambda n: self.on_count(n - 1), [self.count],
                                  [self.count] + self.concept_boxes, queue=False)

    def on_train(self, *args) -> str:
        count, values = self._values(args)
        return self.actions.train(values, count)

    def stream(self):
        """Yield the progress view until the run (and the list refresh after it) ends. The list
        of saved checkpoints is sent only when it grows (a pick the user made stays); when a run
        that was seen running ends, its "started" banner clears and "Saved models" is re-read."""
        listed, seen_active = None, False
        while True:
            view = self.actions.status_view()
            seen_active = seen_active or view.active
            ended = seen_active and not view.active
            saved = gr.update() if view.checkpoints == listed else \
                gr.update(choices=view.checkpoints, value=view.selected or None)
            listed = view.checkpoints
            yield (view.progress_html, view.result_html, compat.gallery_value(view.samples),
                   view.loss_html, view.final_path, view.log, saved,
                   "" if ended else gr.update(),
                   gr.update(choices=self.actions.model_names()) if ended else gr.update(),
                   gr.update(visible=view.can_use))
            if not view.active:
                return
            time.sleep(POLL_S)

    def on_save(self, *args):
        count, values = self._values(args)
        message = self.actions.save_settings(values, count)
        return message, gr.update(choices=self.actions.model_names())

    def on_create(self, *args):
        count, values = self._values(args)
        message = self.actions.create_model(values, count)
        return message, gr.update(choices=self.actions.model_names())

    def on_load(self, model_name: str):
        values, count, message = self.actions.load_settings(model_name)
        boxes = [gr.update(visible=i < count) for i in range(fields.MAX_CONCEPTS)]
        values.update({k: self.actions.part_value(k, values[k], self.parts)
                       for k in PART_FIELDS if self.parts is not None})
        return [message, count] + boxes + [values[k] for k in self.widgets]

    def on_refresh(self):
        """The checkpoint list and (where the host lists them) the part files, re-read."""
        source = gr.update(choices=self.actions.refresh_checkpoint_titles())
        if self.parts is None:
            return source
        self.parts = self.actions.part_files(refresh=True)
        return [source] + [gr.update(choices=sorted(self.parts or {})) for _ in PART_FIELDS]

    def on_source(self, source: str, current_type: str):
        detected = self.actions.detect_type(source)
        if detected is None or detected == current_type:
            return gr.update(), ""
        host = self.actions.host
        if host.model_types is not None and detected not in host.model_types:  # Flux in A1111
            return gr.update(), render.banner(
                "error", f"This checkpoint is {detected}. {host.no_flux_note}")
        return gr.update(value=detected), render.banner(
            "info", f"Model type set to {detected} (detected from the checkpoint); change it "
            "if that is wrong.")

    def on_count(self, n: int):
        n = max(1, min(int(n or 1), fields.MAX_CONCEPTS))
        return [n] + [gr.update(visible=i < n) for i in range(fields.MAX_CONCEPTS)]


def build_tab(host: Host, manager: RunManager | None = None, banner: str = "") -> Tab:
    """Build the tab; `tab.blocks` is what the WebUI's on_ui_tabs callback returns."""
    tab = Tab(host, manager, banner)
    tab.build()
    return tab
