"""The embed stage: CLIP embeddings of a scene's rendered views and over-segments into the store,
and the text embeddings of a vocabulary.

Reads:  views/rgb, views/point_index (render), overseg/segment (overseg); a CLIP model folder or
        hub id (a teacher folder through `pipeline.teacher.folder`).
Writes: clip/view, clip/segment, clip/segment_seen (per scene, one atomic group),
        vocab/<name> (text embeddings, once per store: `run_vocabulary`, the stage's last step).

Per scene (the executor's CPU workers; the model is loaded once per process) or, on a GPU with a
local or synchronous executor, all scenes in one process with crops batched across scenes
(`embed_scenes`): `ws3d embed` and a workflow's embed stage both go through `run_stage`, so they
take the same path.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

from typing import TYPE_CHECKING

import numpy as np

from pipeline import schema
from pipeline.clip.defaults import is_local_model
from pipeline.config import ConfigError
from pipeline.embed.config import EmbedConfig, result_fields
from pipeline.errors import SceneError
from pipeline.executor import ExecutorConfig, RunReport, SceneResult
from pipeline.stage import Stage, StageOption, StageOutput, StageRun, write_output
from pipeline.store import Store
from pipeline.teacher.folder import corpus_record, model_templates

if TYPE_CHECKING:  # the stage's declaration stays light: torch and the model load when a scene runs
    from pipeline.clip.model import ClipEncoder
    from pipeline.embed.core import SceneEmbedding

VOCAB_NAME = "classes"
"""The vocabulary of the store's class names that the stage writes last."""


def check_model(model: str, *, allow_download: bool = True, load: bool = False) -> str | None:
    """Check that embed's CLIP model can be had before the stage runs on every scene.

    A folder must hold a model (config.json). A hub id must be in the local Hugging Face cache,
    unless downloads are allowed (then a note is returned; with ``load`` the model is loaded once,
    which downloads it or fails once instead of once per scene).

    Raises:
        ModelLoadError (a UserError) naming the model and what to do.
    """
    from pipeline.clip.model import ModelLoadError, load_encoder, model_identity

    if is_local_model(model):
        model_identity(model)  # raises ModelLoadError naming the folder
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    except (ImportError, ValueError):
        cached = False
    if cached:
        return None
    offline = not allow_download or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if offline:
        raise ModelLoadError(
            f"embed.model={model!r} is a hub id that is not in the local Hugging Face cache and downloads are off; "
            "pass embed.model=<a CLIP folder>, or stages=[ingest,overseg,render] to stop before embed"
        )
    if load:
        load_encoder(model, device="cpu", allow_download=True)  # downloads into the cache, or raises once
        return None
    return f"embed: {model} is not in the local Hugging Face cache; the embed stage will download it (needs network)"


def _encoder(cfg: EmbedConfig) -> ClipEncoder:
    from pipeline.clip.model import cached_encoder

    return cached_encoder(cfg.model, device=cfg.device, dtype=cfg.dtype, allow_download=cfg.allow_download)


def _read_scene(store: Store, scene_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        store.read(scene_id, schema.VIEW_RGB),
        store.read(scene_id, schema.VIEW_POINT_INDEX),
        store.read(scene_id, schema.SEGMENT),
    )


def _output(result: SceneEmbedding, identity: str, seconds: float, mode: str) -> StageOutput:
    stats = {
        "views": int(len(result.view)), "segments": int(len(result.segment)),
        "seen": int(result.seen.sum()), "crops": int(result.crops), "mode": mode, "dim": int(result.view.shape[1]),
        "model": identity, "seconds": round(seconds, 3),
    }
    arrays = {
        schema.CLIP_VIEW: result.view,
        schema.CLIP_SEGMENT: result.segment,
        schema.CLIP_SEGMENT_SEEN: result.seen.astype(np.uint8),
    }
    return StageOutput(arrays, stats)


def check_finite(scene_id: str, result: SceneEmbedding, model: str) -> None:
    """SceneError when an embedding is not finite as stored (float16): a broken model (e.g. an
    `image_std` of 0 in its preprocessor) writes NaN, and a scene must not be "done" with it."""
    bad = {name: int((~np.isfinite(np.asarray(array, dtype=np.float32).astype(np.float16))).any(axis=-1).sum())
           for name, array in (("view", result.view), ("segment", result.segment))}
    if any(bad.values()):
        raise SceneError(scene_id, model, f"embed: {bad['view']} of {len(result.view)} view and {bad['segment']} of "
                         f"{len(result.segment)} segment embeddings are not finite (NaN or inf); the model's output "
                         "is broken (its preprocessor_config.json: image_std 0?)")


def compute(store: Store, scene_id: str, cfg: EmbedConfig, run: StageRun) -> StageOutput:
    """Embed one scene's views and segments."""
    from pipeline.embed.core import embed_scene

    start = time.perf_counter()
    encoder = _encoder(cfg)
    try:
        view_rgb, point_index, segment = _read_scene(store, scene_id)
        result = embed_scene(view_rgb, point_index, segment, encoder, cfg)
    except (KeyError, ValueError) as exc:
        raise SceneError(scene_id, None, f"embed: {exc}") from exc
    check_finite(scene_id, result, cfg.model)
    return _output(result, encoder.identity, time.perf_counter() - start, cfg.mode)


def _model_identity(run: StageRun) -> tuple[str, ...]:
    from pipeline.clip.model import model_identity

    if not run.cfg.model:
        raise ConfigError("EmbedConfig.model is empty: give a CLIP folder or hub id (model=...)")
    return (model_identity(run.cfg.model),)


def embed_scenes(
    store_path: str, scene_ids: Sequence[str], cfg: EmbedConfig, *, force: bool = False, verbose: bool = True
) -> list[SceneResult]:
    """Embed many scenes with one model, batching crops across scenes (the GPU path).

    Scenes are read one ahead in a background thread; the encoder sees full batches of
    `batch_size` images regardless of scene boundaries. Complete scenes are skipped; a scene
    that fails is reported and the others go on. Prints images/s when `verbose`.
    """
    import torch

    from pipeline.embed.core import Chunk, _SceneWork, _prepare, batch_size, encode_chunk

    store = Store.open(store_path)
    run = StageRun(store=store_path, cfg=cfg, force=force)
    encoder = _encoder(cfg)
    batch = batch_size(cfg, encoder)
    results: dict[str, SceneResult] = {}
    todo: list[tuple[str, str]] = []
    for scene_id in scene_ids:
        try:
            h = EMBED.scene_hash(store, scene_id, run)
        except (SceneError, ConfigError) as exc:
            results[scene_id] = SceneResult(scene_id, "failed", error=str(exc), file=getattr(exc, "file", None))
            continue
        if not force and store.is_complete(scene_id, EMBED.name, h):
            results[scene_id] = SceneResult(scene_id, "skipped")
        else:
            todo.append((scene_id, h))

    images = 0
    start = time.perf_counter()
    open_works: deque[_SceneWork] = deque()
    buffer: list[tuple[_SceneWork, Chunk]] = []

    def flush() -> None:
        nonlocal images
        if buffer:
            # one encoder batch for the chunks of several scenes: regions renumbered to the batch
            offsets = np.cumsum([0] + [len(c.pixels) for _, c in buffer])
            merged = Chunk(torch.cat([c.pixels for _, c in buffer]),
                           np.concatenate([c.region_image + o for (_, c), o in zip(buffer, offsets)]),
                           np.concatenate([c.region_mask for _, c in buffer]))
            emb, regions = encode_chunk(encoder, merged, cfg, batch)
            images += len(merged.pixels)
            r = 0
            for (work, chunk), o in zip(buffer, offsets):
                work.images_out.append(emb[o:o + len(chunk.pixels)])
                work.regions_out.append(regions[r:r + len(chunk.region_image)])
                r += len(chunk.region_image)
            buffer.clear()
        # scenes whose images have all been cut and encoded are written, in order
        while open_works and open_works[0].produced and open_works[0].received == open_works[0].total:
            work = open_works.popleft()
            seconds = time.perf_counter() - work.start
            embedding = work.finish(encoder.dim)
            try:
                check_finite(work.scene_id, embedding, cfg.model)
            except SceneError as exc:
                results[work.scene_id] = SceneResult(work.scene_id, "failed", error=str(exc), file=exc.file)
                continue
            results[work.scene_id] = write_output(store, EMBED, work.scene_id, cfg, work.config_hash,
                                                  _output(embedding, encoder.identity, seconds, cfg.mode),
                                                  seconds=seconds)

    with ThreadPoolExecutor(max_workers=1) as pool:
        queue = iter(todo)
        reading: deque[tuple[str, str, Future]] = deque()

        def read_next() -> None:
            item = next(queue, None)
            if item is not None:
                reading.append((item[0], item[1], pool.submit(_read_scene, store, item[0])))

        read_next()
        while reading:
            scene_id, h, future = reading.popleft()
            read_next()  # the next scene decompresses while this one is encoded
            t0 = time.perf_counter()
            try:
                work = _prepare(scene_id, *future.result(), encoder, cfg, None)
            except (KeyError, ValueError) as exc:
                results[scene_id] = SceneResult(scene_id, "failed", error=f"scene {scene_id}: embed: {exc}")
                continue
            work.config_hash, work.start = h, t0
            open_works.append(work)
            for chunk in work.chunks(encoder, batch, cfg.max_supersample):
                buffer.append((work, chunk))
                if sum(len(c.pixels) for _, c in buffer) >= batch:
                    flush()
            work.produced = True
        flush()
    seconds = time.perf_counter() - start
    if verbose and todo:
        print(
            f"embed: {len(todo)} scenes, {images} images in {seconds:.1f} s "
            f"({images / max(seconds, 1e-9):.1f} images/s) on {encoder.device} {str(encoder.dtype).replace('torch.', '')}, "
            f"batch {batch}"
        )
    return [results[s] for s in scene_ids]


def _run_batched(run: StageRun, ids: list[str], executor: ExecutorConfig) -> RunReport | None:
    """Crops batched across scenes in this process when a GPU is there (the fast path); None
    otherwise (then every scene goes through the executor like the other stages)."""
    import torch

    if not (torch.cuda.is_available() and executor.kind in ("local", "sync")):
        return None
    start = time.perf_counter()
    return RunReport("embed", embed_scenes(run.store, ids, run.cfg, force=run.force), time.perf_counter() - start)


def run_vocabulary(
    store_path: str,
    model: str | ClipEncoder,
    names: Sequence[str] | None = None,
    vocab_name: str = VOCAB_NAME,
    templates: Sequence[str] | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Embed a vocabulary (default: the store's class names) and write `vocab/<vocab_name>`.

    `templates` default: the ones a teacher folder was trained with (its teacher_config.json),
    else `DEFAULT_TEMPLATES`. The attrs hold `names`, `prompts` (the templates) and `model` (the
    model identity, so a reader can check that scene and text embeddings share one model), and for
    a teacher folder `teacher_corpus`: what it was fitted on (checked by pre-training/fine-tuning).
    """
    from pipeline.clip.model import ClipEncoder, ModelLoadError, cached_encoder, embed_vocabulary

    store = Store.open(store_path)
    encoder = model if isinstance(model, ClipEncoder) else cached_encoder(model, device=device, dtype=dtype)
    if templates is None:
        templates = model_templates(model if isinstance(model, str) else None)
    names = list(store.class_names if names is None else names)
    text = embed_vocabulary(names, templates, encoder)
    if not np.isfinite(np.asarray(text, dtype=np.float32).astype(np.float16)).all():
        raise ModelLoadError(f"embed: the text embeddings of vocabulary {vocab_name!r} by {encoder.identity} are not "
                          "finite (NaN or inf): the model is broken; nothing written")
    attrs = {"names": names, "prompts": list(templates), "model": encoder.identity, "dim": int(text.shape[1])}
    provenance = corpus_record(model if isinstance(model, str) else None)
    if provenance is not None:  # what the teacher was fitted on: the trainers check it against their scenes
        attrs["teacher_corpus"] = provenance
    store.write_vocab(vocab_name, text, attrs)
    return {"vocab": vocab_name, "classes": len(names), "dim": int(text.shape[1]), "model": encoder.identity}


def _prepare_run(run: StageRun) -> None:
    """The model must be there: checked (and loaded) once, not once per scene."""
    check_model(run.cfg.model, allow_download=run.cfg.allow_download, load=True)


def _finish(run: StageRun, report: RunReport) -> str | None:
    """The store's class vocabulary with the same model (once: by the first shard of an array job)."""
    if run.shard and not run.shard.startswith("0/"):
        return None
    store = Store.open(run.store)
    run_vocabulary(run.store, run.cfg.model, store.class_names, vocab_name=VOCAB_NAME)
    return f"vocabulary '{VOCAB_NAME}' ({len(store.class_names)} names) embedded"


def summarise(store: Store) -> dict[str, Any]:
    """For `ws3d info`: scenes embedded, views/segments/seen/crops totals, modes, models, vocabularies."""
    done, views, segments, seen, crops, models, modes = 0, 0, 0, 0, 0, set(), set()
    for scene_id in store.scene_ids():
        record = store.stage_record(scene_id, "embed")
        if record is None:
            continue
        stats = record.get("stats", {})
        done += 1
        views += stats.get("views", 0)
        segments += stats.get("segments", 0)
        seen += stats.get("seen", 0)
        crops += stats.get("crops", 0)
        models.add(stats.get("model", "?"))
        modes.add(stats.get("mode", "crops"))  # records from before modes existed: crops
    return {
        "scenes_embedded": done, "views": views, "segments": segments, "segments_seen": seen,
        "crops": crops, "modes": sorted(modes), "models": sorted(models), "vocabularies": store.vocab_names(),
    }


EMBED = Stage(
    name="embed", config=EmbedConfig, help="CLIP embeddings of views, segments and the class vocabulary.",
    reads=("views", "overseg"), writes=schema.STAGE_GROUPS["embed"], upstream=("overseg", "render"),
    compute=compute, summarise=summarise, hashed=result_fields, hash_inputs=_model_identity, prepare=_prepare_run, finish=_finish,
    run_batched=_run_batched,
    options=(StageOption("model", ("--model", "-m"), "CLIP folder (offline) or hub id.", required=True),),
)
"""The embed stage."""
