"""modules.ui_components: the small gradio subclasses extensions use (1.10 names)."""
import gradio as gr


class FormComponent:
    def get_expected_parent(self):
        return gr.components.Form


class ToolButton(gr.Button, FormComponent):
    """Small button with single emoji as text, fits inside gradio forms"""

    def __init__(self, *args, **kwargs):
        classes = kwargs.pop("elem_classes", [])
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

    def get_block_name(self):
        return "button"


class FormRow(gr.Row, FormComponent):
    def get_block_name(self):
        return "row"


class FormColumn(gr.Column, FormComponent):
    def get_block_name(self):
        return "column"


class FormGroup(gr.Group, FormComponent):
    def get_block_name(self):
        return "group"
