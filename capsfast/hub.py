"""The Hugging Face Hub's way to share a model: `save_pretrained`, `from_pretrained`, `push_to_hub`.

CapsNet and the baseline CNN inherit `HubMixin`, huggingface_hub's `ModelHubMixin` with capsfast's
own format underneath: a saved directory is exactly an export (`model.safetensors`, `config.json`,
see capsfast.export) plus its model card (`README.md`, capsfast.model_card), so
`capsfast.load_model` and `from_pretrained` read the same directories, and predict, visualize and
the app take a directory downloaded from the Hub as they are.

    model = capsfast.load_model("runs/capsnet/model")   # carries the run's card along
    model.save_pretrained("capsnet-mnist")               # model.safetensors, config.json, README.md
    model = CapsNet.from_pretrained("capsnet-mnist")     # a directory: offline
    model.push_to_hub("you/capsnet-mnist")               # needs the network and a token

`from_pretrained` with a name that is not a local directory (nor a shipped model's name) reads a
Hub repository: that needs the network, and without it the error is one line that says so.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelHubMixin

CARD = "README.md"
# What a Hub download fetches: the export and its card, nothing else the repository may hold.
HUB_FILES = ["model.safetensors", "config.json", CARD]


class HubMixin(
    ModelHubMixin,
    library_name="capsfast",
    license="mit",
    pipeline_tag="image-classification",
    tags=["capsule-network"],
):
    """save_pretrained / from_pretrained / push_to_hub in capsfast's export format.

    A model loaded from a directory keeps that directory's `meta` (provenance: data set, run,
    step) and its card, so that saving it again writes the same card: the card's figures come
    from the run's summary.json (capsfast.model_card), never from this class."""

    export_meta: dict | None = None  # config.json's "meta" of the directory it was loaded from
    card_text: str | None = None  # that directory's README.md

    def _save_pretrained(self, save_directory: Path) -> None:
        from capsfast.export import save_model

        save_model(self, save_directory, meta=self.export_meta)
        # Always rewritten, byte for byte: a card left in the directory may describe other
        # weights (ModelCard would re-serialise its YAML).
        (save_directory / CARD).write_text(self._card())

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return ModelCard(self._card())

    def _card(self) -> str:
        """The card this model was loaded with, else one that names the model and nothing it
        did not measure (capsfast.model_card.plain_card)."""
        from capsfast.export import architecture
        from capsfast.model_card import plain_card

        if self.card_text:
            return self.card_text
        meta = self.export_meta or {}
        return plain_card(architecture(self), dataset=meta.get("dataset"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, device="cpu", routing="auto",
                        **kwargs):  # fmt: skip
        """Load from a directory written by save_pretrained or by training (or a shipped
        model's name), offline, exactly as capsfast.load_model; any other name is a Hub
        repository id (`namespace/name`), downloaded (the network) into the Hub's cache.
        Raises capsfast's ModelError, one line, for anything that cannot be loaded."""
        from capsfast.export import model_dir

        source = str(pretrained_model_name_or_path)
        if model_dir(source).exists() or _looks_like_path(source):
            return _check_class(cls, _load(model_dir(source), device, routing), source)
        try:
            return super().from_pretrained(source, device=device, routing=routing, **kwargs)
        except _hub_errors() as e:  # anything else is a bug and keeps its traceback
            raise _hub_error(source, e) from None

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download,
                         local_files_only, token, device="cpu", routing="auto",
                         **unused):  # fmt: skip
        # `unused` holds what ModelHubMixin read from config.json for __init__: capsfast's
        # loader reads and checks that file itself.
        from huggingface_hub import snapshot_download

        directory = snapshot_download(
            repo_id=model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=HUB_FILES,
        )
        return _check_class(cls, _load(Path(directory), device, routing), model_id)


def _load(directory: Path, device, routing):
    from capsfast.export import load_model

    return load_model(directory, device=device, routing=routing)


def _looks_like_path(source: str) -> bool:
    """A Hub id is `name` or `namespace/name`; anything else is meant as a local path, and a
    missing one is load_model's "no such model directory", not a download attempt."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _check_class(cls, model, source: str):
    """`CapsNet.from_pretrained` on a baseline's directory (or the reverse) is refused:
    capsfast.load_model takes either."""
    from capsfast.export import ModelError

    if not isinstance(model, cls):
        raise ModelError(
            f"{source} holds a {type(model).__name__}, not a {cls.__name__}: use "
            f"{type(model).__name__}.from_pretrained, or capsfast.load_model (either kind)"
        )
    return model


def _hub_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises when a repository cannot be read (no network included)."""
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.HFValidationError, errors.EntryNotFoundError,
            errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)  # fmt: skip


def _hub_error(source: str, e: Exception) -> Exception:
    """What went wrong reading `source` from the Hub, as capsfast's one-line ModelError."""
    from huggingface_hub import errors

    from capsfast.export import ModelError

    where = f"{source} is no local model directory, so it was read as a Hugging Face Hub id"
    if isinstance(e, errors.HFValidationError):
        return ModelError(f"{source}: no such model directory, and not a Hub id (namespace/name)")
    if isinstance(e, errors.RepositoryNotFoundError):  # also gated or private
        return ModelError(f"{where}: no such repository, or it is private or gated (log in "
                          "with `hf auth login`)")  # fmt: skip
    if isinstance(e, errors.RevisionNotFoundError):
        return ModelError(f"{where}: no such revision")
    if isinstance(e, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError,
                      ConnectionError, TimeoutError)):  # fmt: skip
        return ModelError(f"{where}, which needs the network (not reachable here, or "
                          "HF_HUB_OFFLINE is set); connect, or give the directory of a saved "
                          "model")  # fmt: skip
    return ModelError(f"{where}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
