"""The identity adapters of one loaded model, kept in its `state`: loaded with the model
(`load_identity_adapter`, may download), got by requests (`identity_adapter`, local files only),
released to free memory (`release_identity_adapter`)."""
from __future__ import annotations

from ...identity_methods import resolve_method
from .adapter import IdentityAdapter


def _adapters(model) -> dict:
    return model.state.setdefault("identity_adapters", {})


def _method(model, method: str | None) -> str:
    profile = model.profile
    return resolve_method(profile.name, profile.offered_identity_methods, method)


def load_identity_adapter(model, method: str | None = None, *, download: bool = True) -> IdentityAdapter:
    """The model's adapter for `method` (None: the profile's default), loading it when it is not
    loaded (first load, or after a release); `download`: weights may be fetched from the hub
    (the engine's model load), else only local files and the hub cache are read.
    `model.state["ip_adapter"]` is the default method's."""
    method = _method(model, method)
    adapters = _adapters(model)
    adapter = adapters.get(method)
    if adapter is None or not adapter.loaded:
        adapter = IdentityAdapter(model.pipe, model.profile.identity_methods[method], model.profile.name,
                                  download=download)
        adapters[method] = adapter
        if method == model.profile.identity_method:
            model.state["ip_adapter"] = adapter
        if model.warm:  # at load, the engine reads `applied` once everything is in place
            model.refresh_applied()
    return adapter


def identity_adapter(model, method: str | None = None) -> IdentityAdapter:
    """The adapter a request uses: the one loaded with the model, or (after a release, or for a
    method whose files were missing at load) loaded again from local files only; never downloads."""
    return load_identity_adapter(model, method, download=False)


def release_identity_adapter(model, method: str | None = None) -> bool:
    """Unload the model's identity adapters (or one method's) to free their memory; the next
    identity request loads them again (and, on a compiled model, compiles the identity graphs
    again). Returns whether one was loaded."""
    adapters = _adapters(model)
    names = [method] if method else list(adapters)
    released = False
    for name in names:
        adapter = adapters.pop(name, None)
        if adapter is not None and adapter.loaded:
            adapter.unload()
            released = True
        if model.state.get("ip_adapter") is adapter:
            model.state.pop("ip_adapter", None)
    if not adapters:
        model.state.pop("identity_adapters", None)
        model.state.pop("ip_adapter", None)
    if released:
        model.refresh_applied()
    return released
