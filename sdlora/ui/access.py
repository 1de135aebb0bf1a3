"""What a client of this server may do beyond its own uploads: which server folders it may name, and
whether it may switch the base model. No gradio here: the Studio asks, the tabs show the refusals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import ConfigError


@dataclass(frozen=True)
class Access:
    """What a client of this server may do beyond its own uploads: read folders under `roots`, switch the model.

    A client names folders (regularisation images, a concept folder, a base model) on the server's
    disk; outside the roots they are refused before anything reads them, so an error never lists
    a server folder's files.
    """

    roots: tuple[Path, ...] = ()  # besides the studio's own: its concepts folder, assets/ and work folder
    model_switch: bool = True  # False on a shared server: the one resident model is everyone's

    def check_folder(self, path: str, what: str) -> Path:
        """The resolved path when it lies under a root; ConfigError in one line otherwise."""
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise ConfigError(
                f"{what} {path} is outside the folders this server lets clients read "
                f"({', '.join(map(str, self.roots))}); the server's --allowed-roots adds more"
            )
        return resolved

    def check_model_switch(self) -> None:
        """Refuse, in one line, to switch the base model of a shared server."""
        if not self.model_switch:
            raise ConfigError(
                "this server is shared, so its base model is a server setting (--base-model): "
                "switching it here would change it for everyone"
            )

    def with_roots(self, *roots: str | Path) -> Access:
        """The same policy with more roots, all resolved."""
        every = dict.fromkeys((*roots, *self.roots))
        return Access(tuple(Path(r).expanduser().resolve() for r in every), self.model_switch)
