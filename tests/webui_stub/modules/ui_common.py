"""modules.ui_common.create_refresh_button (1.10 signature: one component or a list)."""
import gradio as gr

from modules.ui_components import ToolButton

refresh_symbol = '\U0001f504'


def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    refresh_components = refresh_component if isinstance(refresh_component, list) else [refresh_component]

    def refresh():
        refresh_method()
        args = refreshed_args() if callable(refreshed_args) else refreshed_args
        for k, v in args.items():
            for comp in refresh_components:
                setattr(comp, k, v)
        if len(refresh_components) > 1:
            return [gr.update(**(args or {})) for _ in refresh_components]
        return gr.update(**(args or {}))

    refresh_button = ToolButton(value=refresh_symbol, elem_id=elem_id)
    refresh_button.click(fn=refresh, inputs=[], outputs=refresh_components)
    return refresh_button
