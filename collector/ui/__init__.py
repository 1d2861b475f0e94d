"""flowscope's web dashboards: the pages (static/), their JSON panels (dashboards.py), the
aiohttp application serving both (app.py) and ``flowscope ui`` (cli.py)."""
