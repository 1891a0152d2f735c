"""The Gradio UI of Mipha Chat.

`app.ui.build_app(services)` returns the page; `app.services.Services` is what it needs;
`app.settings.Settings` is what `launch.py` decides. Nothing is imported here so that
`launch.py --help` (which needs only the settings) stays instant.
"""
