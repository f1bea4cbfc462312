"""The host stage: what runs beside a host (the WebUI, the standalone app, a terminal).

In: what a host knows (its folders, its checkpoint list, how to refresh it, its GPU lock) through
`interface.Host`, and what a user types: CLI flags, the tab's widgets, HTTP requests. Out: a
`TrainingConfig` run in a child process (`runner`) whose events become progress, previews and a
loss curve; the command line (`cli`, `progress`, `demo`), the HTTP API (`api`) and the tab
(`ui/`).

The WebUI process imports `interface`, `runner`, `api` and `ui` without torch: training itself
runs in the child (`python -m dreambooth train`). May import every stage below.
"""
