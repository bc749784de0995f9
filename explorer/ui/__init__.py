"""The app's tabs (Gradio): `context` (what app.py and the tabs share), `compare` (lanes, views, what if) and
`history` (stored runs: list, open, export, delete). app.py lays them out and launches; nothing here imports it."""
