"""deltadrive emblems for Nautilus, Nemo and Caja.

Shows the sync state of every file in a deltadrive mount as an emblem, read from the file's
`user.deltadrive.status` attribute (computed by the mount, never stored):

    synced       emblem-default         (a check mark)
    pending      emblem-synchronizing   (waiting to be sent)
    conflict     emblem-important       (a conflicted copy)
    online-only  emblem-web             (content on the server only)
    ignored      no emblem              (.deltaignore or a temporary file; stays on this device)

Install (the Debian package does this): copy this file to
  /usr/share/nautilus-python/extensions/  (package python3-nautilus)
  /usr/share/nemo-python/extensions/      (package nemo-python)
  /usr/share/caja-python/extensions/      (package python3-caja)
and restart the file manager (`nautilus -q`).
"""

import os
from urllib.parse import unquote, urlparse

ATTRIBUTE = "user.deltadrive.status"
EMBLEMS = {
    "synced": "emblem-default",
    "pending": "emblem-synchronizing",
    "conflict": "emblem-important",
    "online-only": "emblem-web",
}


def status_of(path):
    """The sync state of `path`, or None outside a deltadrive mount."""
    try:
        return os.getxattr(path, ATTRIBUTE, follow_symlinks=False).decode("utf-8", "replace")
    except OSError:
        return None


def emblem_for(path):
    state = status_of(path)
    return EMBLEMS.get(state) if state else None


def _file_manager():
    """The extension API of whichever file manager loaded us."""
    import gi

    for name, versions in (("Nautilus", ("4.0", "3.0")), ("Nemo", ("3.0",)), ("Caja", ("2.0",))):
        for version in versions:
            try:
                gi.require_version(name, version)
            except (ValueError, AttributeError):
                continue
            try:
                module = __import__("gi.repository", fromlist=[name])
                return getattr(module, name)
            except (ImportError, AttributeError):
                continue
    return None


_FM = _file_manager()

if _FM is not None:
    from gi.repository import GObject

    class DeltadriveEmblems(GObject.GObject, _FM.InfoProvider):
        """Adds the emblem of each local file's sync state."""

        def update_file_info(self, file):
            uri = file.get_uri()
            if not uri.startswith("file://"):
                return
            emblem = emblem_for(unquote(urlparse(uri).path))
            if emblem:
                file.add_emblem(emblem)
