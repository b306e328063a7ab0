"""What a profile needs from the Hugging Face hub, whether it is already there, and fetching it.

`pull_plan(profile)` lists, per hub repository, the exact files (or small-file patterns) the
profile loads: the pipeline's folders in its variant, each identity method's weights (FaceID Plus
v2's CLIP-ViT-H image encoder, InstantID's ControlNet + ip-adapter.bin), its style LoRAs, a single-file
checkpoint's config repository; plus what no official hub hosts (insightface model packs) and
local paths, which are only checked. `pull(plan)` runs `snapshot_download` with those
`allow_patterns` (resumable, progress bars, HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN
honoured by huggingface_hub itself) and skips repositories whose files are already in the cache.
Licences are carried per item so the CLI prints them next to each file, and `doctor` reports them.
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelProfile
from ..errors import ProfileError
from ..faces.compat import trained_identity_methods
from ..faces.insightface_backend import KNOWN_PACKS, resolve_model_dir


@dataclass(frozen=True)
class Licence:
    name: str
    commercial: bool | None  # None: not known here; read the model card
    note: str = ""

    def describe(self) -> str:
        use = {True: "commercial use allowed", False: "NON-COMMERCIAL", None: "check the model card"}[self.commercial]
        return f"{self.name} ({use}{'; ' + self.note if self.note else ''})"


LICENCES: dict[str, Licence] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": Licence("CreativeML OpenRAIL-M", True,
                                                           "with the licence's use restrictions"),
    "stabilityai/stable-diffusion-xl-base-1.0": Licence("CreativeML OpenRAIL++-M", True,
                                                        "with the licence's use restrictions"),
    "stabilityai/sdxl-turbo": Licence("Stability AI non-commercial research community licence", False,
                                      "commercial use needs a licence from Stability AI"),
    "h94/IP-Adapter-FaceID": Licence("IP-Adapter FaceID model card", False,
                                     "non-commercial research only: built on InsightFace's recogniser"),
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": Licence("MIT", True),
    "InstantX/InstantID": Licence("Apache-2.0", True,
                                  "needs ArcFace embeddings; insightface's antelopev2 pack is non-commercial"),
}
INSIGHTFACE_LICENCE = Licence("InsightFace model zoo", False, "non-commercial research only")
UNKNOWN_LICENCE = Licence("unknown", None)
#: The insightface pack each identity method's released weights were trained with.
METHOD_FACE_PACK = {"faceid": "buffalo_l", "faceid-plus-v2": "buffalo_l", "instantid": "antelopev2"}


def licence_of(repo_id: str) -> Licence:
    return LICENCES.get(repo_id, UNKNOWN_LICENCE)


@dataclass(frozen=True)
class HubItem:
    """Files of one hub repository: exact paths, or globs for small config/tokenizer files."""

    repo_id: str
    patterns: tuple[str, ...]
    purposes: tuple[str, ...]
    revision: str | None = None

    @property
    def licence(self) -> Licence:
        return licence_of(self.repo_id)


@dataclass(frozen=True)
class ManualItem:
    """Files no official hub hosts: the user puts them in `folder`; we only check them."""

    name: str
    folder: str
    files: tuple[str, ...]
    purpose: str
    licence: Licence
    how: str


@dataclass
class PullPlan:
    profile: str
    hub: list[HubItem] = field(default_factory=list)
    manual: list[ManualItem] = field(default_factory=list)
    local: list[str] = field(default_factory=list)  # local files/folders the profile names (checked, not fetched)

    @property
    def empty(self) -> bool:
        return not (self.hub or self.manual or self.local)


def pipeline_patterns(architecture: str, variant: str | None) -> list[str]:
    """The files `from_pretrained` reads for a text-to-image pipeline in diffusers layout."""
    suffix = f".{variant}" if variant else ""
    two = ("", "_2") if architecture == "sdxl" else ("",)
    out = ["model_index.json", "scheduler/scheduler_config.json"]
    for s in two:
        out += [f"tokenizer{s}/*.json", f"tokenizer{s}/*.txt",
                f"text_encoder{s}/config.json", f"text_encoder{s}/model{suffix}.safetensors"]
    for folder in ("unet", "vae"):
        out += [f"{folder}/config.json", f"{folder}/diffusion_pytorch_model{suffix}.safetensors"]
    if architecture == "sd15":
        out.append("feature_extractor/preprocessor_config.json")
    return out


def config_patterns(architecture: str) -> list[str]:
    """A pipeline's configs and tokenizers without weights (for single-file checkpoints)."""
    return [p for p in pipeline_patterns(architecture, None) if not p.endswith(".safetensors")]


def _join(*parts: str | None) -> str:
    return "/".join(p.strip("/") for p in parts if p)


def looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.path.isabs(ref) or os.path.isdir(os.path.expanduser(ref))


def pull_plan(profile: ModelProfile, methods: list[str] | None = None,
              face_model_root: str = "~/.insightface") -> PullPlan:
    """What `profile` (and the identity `methods`, default all it offers) needs on this machine."""
    plan = PullPlan(profile.name)
    if profile.tiny or profile.random_weights:
        return plan  # built from config: nothing to fetch
    wanted: dict[tuple[str, str | None], tuple[list[str], list[str]]] = {}

    def need(repo: str, revision: str | None, patterns: list[str], purpose: str) -> None:
        pats, purposes = wanted.setdefault((repo, revision), ([], []))
        pats.extend(p for p in patterns if p not in pats)
        if purpose not in purposes:
            purposes.append(purpose)

    single = getattr(profile, "single_file", None)
    if single:
        plan.local.append(single)
        cfg = getattr(profile, "single_file_config", None)
        if cfg and not looks_local(cfg):
            need(cfg, profile.revision, config_patterns(profile.architecture), f"{profile.name} pipeline configs")
        elif cfg:
            plan.local.append(cfg)
    elif profile.local_path:
        plan.local.append(profile.local_path)
    elif profile.repo_id:
        need(profile.repo_id, profile.revision, pipeline_patterns(profile.architecture, profile.variant),
             f"{profile.name} pipeline")

    offered = list(profile.identity_methods)
    chosen = offered if methods is None else methods
    unknown = [m for m in chosen if m not in offered]
    if unknown:
        raise ProfileError(f"profile {profile.name!r} offers no identity method {', '.join(map(repr, unknown))}; "
                           f"it offers: {', '.join(offered) or 'none'}", param="identity_methods")
    packs: dict[str, list[str]] = {}
    trained = set(trained_identity_methods(profile))
    for method in chosen:
        src = profile.identity_methods[method]
        if src.tiny:
            continue
        files = [_join(src.subfolder, src.weight_name)] if src.weight_name else []
        if method == "instantid":
            net = src.controlnet or "ControlNetModel"
            files += [f"{net}/config.json", f"{net}/diffusion_pytorch_model.safetensors"]
        if src.local_path:
            plan.local += [os.path.join(src.local_path, f) for f in files]
        elif src.repo_id:
            need(src.repo_id, None, files, f"{method} weights")
        if method == "faceid-plus-v2" and src.image_encoder:
            enc_files = [_join(src.image_encoder_subfolder, f)
                         for f in ("config.json", "preprocessor_config.json", "model.safetensors")]
            if looks_local(src.image_encoder):
                plan.local.append(src.image_encoder)
            else:
                need(src.image_encoder, None, enc_files, "faceid-plus-v2 image encoder (CLIP-ViT-H)")
        if method in trained:
            packs.setdefault(METHOD_FACE_PACK[method], []).append(method)
    for pack in profile.lora_styles:  # style LoRAs: the one weight file each, or a local file to check
        src = pack.lora
        if src.tiny:
            continue
        if src.path:
            plan.local.append(src.path)
        else:
            need(src.repo_id, src.revision, [_join(src.subfolder, src.weight_name or "pytorch_lora_weights.safetensors")],
                 f"style {pack.name} LoRA")
    plan.hub = [HubItem(repo, tuple(pats), tuple(purposes), rev) for (repo, rev), (pats, purposes) in wanted.items()]
    for pack, users in packs.items():
        plan.manual.append(insightface_item(pack, face_model_root, ", ".join(users)))
    return plan


def insightface_item(pack: str, model_root: str, users: str) -> ManualItem:
    folder = os.path.join(os.path.expanduser(model_root), "models", pack)
    return ManualItem(
        name=f"insightface {pack}", folder=folder, files=KNOWN_PACKS.get(pack, ()),
        purpose=f"ArcFace embeddings for {users} (face backend insightface, face model name {pack})",
        licence=INSIGHTFACE_LICENCE,
        how=f"not on an official hub: download {pack}.zip from the insightface model zoo "
            f"(github.com/deepinsight/insightface, python-package model list) and unzip it so that "
            f"{', '.join(KNOWN_PACKS.get(pack, ('*.onnx',)))} are in {folder}/")


# ---- the local hub cache --------------------------------------------------------------------
def hub_cache_dir() -> Path:
    """huggingface_hub's cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` (a branch/tag ref or a commit) in the hub
    cache layout (`models--org--name/refs/<ref>`, `snapshots/<commit>/`), or None."""
    root = Path(cache_dir) if cache_dir else hub_cache_dir()
    repo = root / f"models--{repo_id.replace('/', '--')}"
    ref = revision or "main"
    commit = ref if _COMMIT.match(ref) else None
    ref_file = repo / "refs" / ref
    if commit is None and ref_file.is_file():
        commit = ref_file.read_text(encoding="utf-8").strip()
    snap = repo / "snapshots" / commit if commit else None
    return snap if snap is not None and snap.is_dir() else None


def _snapshot_files(snapshot: Path) -> list[str]:
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def matched_files(item: HubItem, snapshot: Path | None) -> tuple[list[Path], list[str]]:
    """(files present for the item's patterns, patterns with no file) in a snapshot folder."""
    files = _snapshot_files(snapshot) if snapshot else []
    found, missing = [], []
    for pattern in item.patterns:
        hits = [f for f in files if fnmatch.fnmatchcase(f, pattern)]
        found += [snapshot / f for f in hits if snapshot / f not in found]
        if not hits:
            missing.append(pattern)
    return found, missing


def manual_missing(item: ManualItem) -> list[str]:
    """Files of an insightface pack not found where the backend looks for them."""
    model_root = str(Path(item.folder).parent.parent)
    pack = Path(item.folder).name
    folder = resolve_model_dir(model_root, pack)
    if folder is None:
        return list(item.files) or ["*.onnx"]
    return [f for f in item.files if not os.path.isfile(os.path.join(folder, f))]


@dataclass
class ItemStatus:
    item: HubItem
    state: str  # "present" | "downloaded"
    snapshot: Path
    files: list[Path]


def hub_status(item: HubItem, cache_dir: str | os.PathLike | None = None) -> tuple[Path | None, list[Path], list[str]]:
    snap = cached_snapshot(item.repo_id, item.revision, cache_dir)
    found, missing = matched_files(item, snap)
    return snap, found, missing


def pull_item(item: HubItem, cache_dir: str | os.PathLike | None = None, token: str | None = None) -> ItemStatus:
    """Files of one item in the local cache: already there, or fetched with snapshot_download
    (resumes partial downloads). Offline (HF_HUB_OFFLINE) and missing is a ProfileError naming them."""
    snap, found, missing = hub_status(item, cache_dir)
    if snap is not None and not missing:
        return ItemStatus(item, "present", snap, found)
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise ProfileError(f"{item.repo_id}: HF_HUB_OFFLINE is set and the cache lacks {', '.join(missing)}; "
                           f"unset it to download", param="model")
    try:
        path = snapshot_download(item.repo_id, revision=item.revision, allow_patterns=list(item.patterns),
                                 cache_dir=cache_dir, token=token)
    except Exception as exc:  # noqa: BLE001 - network, auth, gated repo: one line for the CLI
        raise ProfileError(f"{item.repo_id}: download failed ({type(exc).__name__}: {exc}). Gated repositories need "
                           f"`huggingface-cli login` or HF_TOKEN", param="model") from exc
    found, missing = matched_files(item, Path(path))
    if missing:
        raise ProfileError(f"{item.repo_id}: downloaded, but no file matches {', '.join(missing)} "
                           f"(revision {item.revision or 'main'})", param="model")
    return ItemStatus(item, "downloaded", Path(path), found)
