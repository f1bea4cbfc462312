"""The host stage: what runs beside a host (the WebUI, the standalone app, a terminal).

In: what a host knows (its folders, its checkpoint list, how to refresh it, its GPU lock) through
`interface.Host`, and what a user types: CLI flags, the tab's values (through `dreambooth.ui`),
HTTP requests. Out: a `TrainingConfig` run in a child process (`runner`) whose events become
progress, previews and a loss curve; the command line (`cli`, `progress`, `demo`) and the HTTP
API (`api`). No gradio here: the tab is the stage above (`dreambooth.ui`).

The WebUI process imports `interface`, `runner` and `api` without torch: training itself
runs in the child (`python -m dreambooth train`). May import every stage below.
"""
