"""An HTML template for `dvc plots show` that works offline: Vega, Vega-Lite and Vega-Embed (the versions DVC's
own template loads from a CDN) inlined, fetched once from the npm registry and checked against their pinned
SHA-512 digests. `make venv` runs it; .dvc/config names the template it writes.

    python scripts/vendor_vega.py [--out .venv/share/cgspn/dvc-plots.html]

Without the registry (or with a digest that does not match) it writes DVC's page instead, which loads the
scripts from the CDN, and says so: the plots then need a network to draw, as before.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / ".venv/share/cgspn/dvc-plots.html"
PACKAGES = {  # package: (version, npm's integrity of its tarball, the script inside it)
    "vega": ("5.20.2", "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
             "package/build/vega.min.js"),
    "vega-lite": ("5.2.0", "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
                  "package/build/vega-lite.min.js"),
    "vega-embed": ("6.18.2", "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
                   "package/build/vega-embed.min.js"),
}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>"""


def fetch(name: str, version: str, integrity: str, member: str) -> str:
    """The script `member` of the package's tarball, once its SHA-512 matches `integrity`."""
    url = f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != integrity:
        raise ValueError(f"{url}: SHA-512 {digest} is not the pinned {integrity}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.extractfile(member).read().decode()


def template() -> str:
    scripts = []
    for name, (version, integrity, member) in PACKAGES.items():
        code = fetch(name, version, integrity, member).replace("</script", "<\\/script")
        scripts.append(f'    <script type="text/javascript">/* {name} {version} */\n{code}\n    </script>')
    return PAGE.format(scripts="\n".join(scripts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    out = parser.parse_args(argv).out
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        page = template()
    except (OSError, ValueError, KeyError, tarfile.TarError) as e:
        page = PAGE.format(scripts="{scripts}")  # DVC puts its CDN script tags there
        print(f"vendor_vega: {e}; {out} loads Vega from the CDN instead (dvc plots show needs a network)",
              file=sys.stderr)
    out.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
