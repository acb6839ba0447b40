"""Fast checks of the Label app's pieces that need no MONAI Label install (run in the project environment).

The bundle, override and checkpoint handling the app relies on is tested in test_bundle_layer.py."""

from __future__ import annotations

import pytest

from ulite_monai.label.serve import main as serve_main
from support.label import REPO


def test_server_binds_loopback_unless_asked(tmp_path, capsys):
    serve_main(["--studies", str(tmp_path), "--port", "8123", "--conf", "configs", "x.json", "--dry-run"])
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--app") + 1] == str(REPO / "ulite_monai" / "label")
    assert ["--conf", "configs", "x.json"] == cmd[cmd.index("--conf"):cmd.index("--conf") + 3]
    serve_main(["--studies", str(tmp_path), "--host", "0.0.0.0", "--dry-run"])
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    with pytest.raises(SystemExit, match="no such folder"):
        serve_main(["--studies", str(tmp_path / "absent"), "--dry-run"])
