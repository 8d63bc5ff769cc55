"""`autointerp`: register the embedded demo SAE, run the demo end to end, steer a latent, search explanations."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_CODER_NAME = "smollm2-topk"
DEMO_HOOKPOINT = "model.layers.15"
DEMO_SHARDS = ("00", "01")
DEMO_LATENTS_WITH_CONTROL = 10
"""Latents with a score beside a control that the demo is sized for ([settings] max_latents_per_shard of the local
deployment): fewer, and the 95 % interval of a scorer's gap is too wide for its verdict to say anything."""


def register_embedded(
    data_dir: str, *, width: int = 4608, k: int = 32, n_tokens: int = 65_536, epochs: int = 3
) -> Path:
    """Train a TopK SAE on the embedded corpus at `model.layers.15` and save it in sparsify's layout."""
    import torch

    from assets.corpus import embedded_documents, tokenize_documents
    from autointerp_defs.demo_sae import train_topk_sae
    from resources.sparse_coders import save_sparsify
    from resources.subject_model import SubjectModelResource, capture_hookpoints
    from storage.layout import DataRoot

    folder = DataRoot.at(data_dir).registry_dir / DEMO_CODER_NAME / DEMO_HOOKPOINT
    if (folder / "sae.safetensors").exists():
        print(f"embedded SAE already registered at {folder}")
        return folder
    subject = SubjectModelResource()
    tokens = tokenize_documents(
        embedded_documents(),
        subject.tokenizer(),
        ctx_len=128,
        n_tokens=n_tokens,
        add_bos=True,
        seed=1,
    )
    lm = subject.causal_lm()
    batches = []
    for start in range(0, len(tokens), 16):
        batch = torch.from_numpy(tokens[start : start + 16]).long()
        batches.append(
            capture_hookpoints(lm, batch, {(DEMO_HOOKPOINT, "output")})[(DEMO_HOOKPOINT, "output")][
                :, 1:
            ].flatten(0, 1)
        )
        print(f"\rtraining data: {start + len(batch)}/{len(tokens)} sequences", end="", flush=True)
    print()

    def progress(step, total, loss):
        if step % 20 == 0 or step == total:
            print(
                f"\rtraining TopK SAE (width {width}, k {k}): step {step}/{total}, normalized MSE {loss:.3f}",
                end="",
                flush=True,
            )

    coder = train_topk_sae(
        torch.cat(batches),
        width=width,
        k=k,
        name=DEMO_CODER_NAME,
        hookpoint=DEMO_HOOKPOINT,
        epochs=epochs,
        progress=progress,
    )
    print()
    save_sparsify(coder, folder)
    print(f"registered {coder.key} at {folder}")
    return folder


def register_coders(
    data_dir: str,
    source: str,
    hookpoints: list[str] | None,
    name: str | None,
    revision: str | None,
    latents_per_shard: int,
) -> None:
    """`autointerp register`: download (or copy) coders into the registry and say what was registered."""
    import math

    from resources.coder_sources import register
    from storage.layout import DataRoot

    for done in register(source, DataRoot.at(data_dir).registry_dir, hookpoints, name, revision):
        where = (
            f"{source}@{done.revision or 'main'} (commit {done.commit})" if done.commit else source
        )
        what = "registered" if done.new else "already registered"
        print(
            f"{what} {done.key}: width {done.width} ({math.ceil(done.width / latents_per_shard)} "
            f"shards of {latents_per_shard}), from {where}, at {done.folder}"
        )


def _materialize(
    selection: list[str], partition_key: str | None, instance, defs, ops: dict | None = None
) -> str | None:
    """Materialize `selection` (with `ops`' run config); None when it succeeded, else why it failed, in the
    failed steps' own words."""
    from dagster import materialize

    assets = list(defs.assets)
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}} | (
        {"ops": ops} if ops else {}
    )
    result = materialize(
        assets,
        selection=selection,
        partition_key=partition_key,
        instance=instance,
        resources=defs.resources,
        run_config=quiet,
        raise_on_error=False,
    )
    if result.success:
        return None
    errors = [
        event.event_specific_data.error
        for event in result.all_events
        if event.is_step_failure and event.event_specific_data.error
    ]
    return (
        "; ".join(root_cause(error).message.split(": ", 1)[-1].strip() for error in errors)
        or "see the run's log above"
    )  # a step's message names its stage


def root_cause(error):
    """The error a step raised, not Dagster's "Error occurred while executing op" around it (a `Failure`'s own
    message is kept, not replaced by the error it was raised from)."""
    while error.cls_name == "DagsterExecutionStepExecutionError" and error.cause is not None:
        error = error.cause
    return error


class CommandError(Exception):
    """A command the user can fix: `main` prints its message, which names the fix, as one line."""


def instance_home() -> tuple[Path, str]:
    """The Dagster instance folder the demo and `materialize` use, and where that choice came from (for messages):
    `$DAGSTER_HOME`, else `./.dagster_home`, the folder the Makefile points it at."""
    from autointerp_defs.deployments import dagster_home

    home = dagster_home()
    return (
        (home, "$DAGSTER_HOME")
        if home
        else (Path(".dagster_home").resolve(), "DAGSTER_HOME is not set; the Makefile's default")
    )


def shard_listing(keys: list[str]) -> str:
    """Partition keys as one line, a range per coder: `a/h|00…04, b/h|00`."""
    from assets.partitions import coder_and_shard, coders_of

    shards = {
        coder: [coder_and_shard(key)[1] for key in keys if coder_and_shard(key)[0] == coder]
        for coder in coders_of(keys)
    }
    return ", ".join(
        f"{coder}|{s[0]}…{s[-1]}" if len(s) > 1 else f"{coder}|{s[0]}"
        for coder, s in shards.items()
    )


def chosen_partition(
    keys: list[str], partition: str | None, coder: str | None, shard: str | None, where: str
) -> str:
    """The partition key that `--partition`, or `--coder` and `--shard`, name; it must be one of the instance's
    `keys`. `--shard 3` means the coder's shard 03."""
    from assets.partitions import coder_and_shard

    if partition is None and (coder is None or shard is None):
        raise CommandError(
            "the selection is partitioned by coder and shard. Fix: add --coder C --shard S "
            f"(or --partition 'C|S'); {where} has {shard_listing(keys)}"
        )
    coder, shard = coder_and_shard(partition) if partition is not None else (coder, shard)
    shards = {coder_and_shard(key)[1]: key for key in keys if coder_and_shard(key)[0] == coder}
    if not shards:
        raise CommandError(
            f"{where} has no coder {coder!r}. Fix: use one of its coders: {shard_listing(keys)}"
        )
    found = shards.get(shard) or next(
        (key for s, key in shards.items() if shard.isdigit() and int(s) == int(shard)), None
    )
    if found is None:
        raise CommandError(
            f"{coder} has no shard {shard!r} in {where}. Fix: use one of {shard_listing(list(shards.values()))}"
        )
    return found


def run_instance_home() -> tuple[Path, str]:
    """The folder of the instance `materialize` and `import` run on, and how messages name the instance;
    no instance there stops with the fix."""
    home, source = instance_home()
    if not (home / "dagster.yaml").is_file():
        raise CommandError(
            f"no Dagster instance at {home} ({source}). Fix: run `make demo` first, "
            "which makes one there, or set DAGSTER_HOME to the folder of the instance that "
            "`make ui` uses"
        )
    return home, f"the instance at {home} ({source})"


def shard_keys(instance, where: str, deployment) -> list[str]:
    """The instance's shard partitions; none yet stops with the fix."""
    from assets.partitions import shard_partitions

    keys = instance.get_dynamic_partitions(shard_partitions.name)
    if not keys:
        raise CommandError(
            f"{where} knows no coder yet. Fix: run `make demo`, "
            f"or drop a coder into {deployment.data_dir}/registry/ with `make ui` "
            "running (its registry sensor adds the coder's shards)"
        )
    return keys


def materialize_selection(
    deployment, selection: str, partition: str | None, coder: str | None, shard: str | None
) -> None:
    """`autointerp materialize`: check that `selection` names assets of the deployment and that the partition
    exists in the instance, then run it in this process as the demo does."""
    from fnmatch import fnmatchcase

    from dagster import DagsterInstance

    from autointerp_defs.definitions import definitions_for

    home, where = run_instance_home()
    defs = definitions_for(deployment)
    partitioned = {
        key.to_user_string(): spec.partitions_def is not None
        for spec in defs.assets
        for key in spec.keys
    }
    chosen, unknown = [], []
    for pattern in filter(None, (part.strip() for part in selection.split(","))):
        matched = [name for name in partitioned if fnmatchcase(name, pattern)]
        chosen += [name for name in matched if name not in chosen]
        unknown += [] if matched else [pattern]
    if unknown or not chosen:
        raise CommandError(
            f"no asset named {', '.join(unknown) or repr(selection)}. "
            f"Fix: name some of {', '.join(partitioned)} (comma-separated; * matches any text)"
        )
    named = partition is not None or coder is not None or shard is not None
    with DagsterInstance.from_config(str(home)) as instance:
        key = None
        if any(partitioned[name] for name in chosen):
            key = chosen_partition(
                shard_keys(instance, where, deployment), partition, coder, shard, where
            )
        elif named:
            raise CommandError(
                f"{', '.join(chosen)} {'is' if len(chosen) == 1 else 'are'} not partitioned. "
                "Fix: drop --partition, --coder and --shard"
            )
        print(f"materializing {', '.join(chosen)} {key or ''} on {where}", flush=True)
        started = time.perf_counter()
        if (failure := _materialize(chosen, key, instance, defs)) is not None:
            raise CommandError(f"materializing {', '.join(chosen)} {key or ''} failed: {failure}")
    print(f"materialized {', '.join(chosen)} {key or ''} in {time.perf_counter() - started:.0f} s")


def calibrate_judge(deployment, latents_per_class: int, random_latents: int, force: bool) -> None:
    """`autointerp calibrate`: materialize the `calibration` asset (and the corpus, where there is none) on the
    instance, as `materialize` does, then print the judge's card, one line per scorer."""
    from dagster import DagsterInstance

    from assets.cards import card_line
    from autointerp_defs.definitions import definitions_for
    from storage.calibration_cards import read_card

    home, where = run_instance_home()
    defs = definitions_for(deployment)
    resources = deployment.resources()
    layout = resources["settings"].store.layout
    judge = resources["llm"].identity("judge")
    chosen = ["calibration"] if layout.corpus_meta_path.exists() else ["corpus", "calibration"]
    config = {
        "latents_per_class": latents_per_class,
        "random_latents": random_latents,
        "force": force,
    }
    print(f"calibrating the judge {judge} on {where}", flush=True)
    started = time.perf_counter()
    with DagsterInstance.from_config(str(home)) as instance:
        failure = _materialize(chosen, None, instance, defs, {"calibration": {"config": config}})
    if failure is not None:
        raise CommandError(f"calibrating {judge} failed: {failure}")
    card = read_card(layout, judge)
    for name in card["scorers"]:
        print(card_line(card, name))
        print(f"  {card['scorers'][name]['verdict']}")
    named = card["named"]
    print(
        f"explanations naming their planted class: {named['named']} of {named['of']} "
        f"(embedder cosine >= {named['threshold']})"
    )
    print(
        f"card {layout.calibration_card_path(judge)} (latents per class: {card['latents_per_class']}, "
        f"made {card['made_at']} in {card['seconds']:.0f} s; now {time.perf_counter() - started:.0f} s)"
    )


def import_delphi(deployment, coder: str, folder: str, module: str | None, model: str) -> None:
    """`autointerp import delphi`: a run of `explanations` with the `delphi` explainer reading `folder`, on each
    shard of `coder` that holds one of its latents, in this process as `materialize` runs it. So an import is in
    the asset's lineage and metadata, holds its lock, syncs the search index, and is re-scored like any other."""
    from dataclasses import replace

    from dagster import DagsterInstance

    from assets.explainers.delphi_folder import read_delphi_explanations
    from autointerp_defs.definitions import definitions_for
    from autointerp_defs.readside import reader

    store = deployment.resources()["settings"].store
    module, texts = read_delphi_explanations(Path(folder), module or "")
    meta = reader.activations_meta(store, coder)
    width = int(meta["width"])
    if outside := sorted(latent for latent in texts if not 0 <= latent < width):
        raise reader.ExportInputError(
            f"delphi explanations of latents {outside[:5]} do not exist in {coder} "
            f"(width {width}). Fix: import into the coder they were written for."
        )
    by_shard: dict[str, list[int]] = {}
    for latent in sorted(texts):
        by_shard.setdefault(reader.shard_of(meta, latent), []).append(latent)
    home, where = run_instance_home()
    settings = {"folder": str(Path(folder).resolve()), "module": module, "model": model}
    explanations = {"explainer": "delphi", "explainer_settings": settings}
    defs = definitions_for(
        replace(deployment, values={**deployment.values, "explanations": explanations})
    )
    with DagsterInstance.from_config(str(home)) as instance:
        keys = shard_keys(instance, where, deployment)
        for shard, latents in by_shard.items():
            key = chosen_partition(keys, None, coder, shard, where)
            table = store.explanations(coder, shard)
            with table.lock(
                f"Writing the explanations of {coder} shard {shard} "
                "(the explanations asset or another import)"
            ):  # refused at once, naming the holder, while a run writes the shard; the run takes the lock itself
                pass
            print(f"importing delphi's explanations of {module} into {key} on {where}", flush=True)
            if (failure := _materialize(["explanations"], key, instance, defs)) is not None:
                raise CommandError(f"importing into {key} failed: {failure}")
            rows = reader.rows_of(table)
            imported = int((rows["status"] == "ok").sum())
            left = (
                ""
                if imported == len(latents)
                else " (the others have no exemplars here, or are past max_latents_per_shard)"
            )
            print(
                f"shard {shard}: imported {imported} of the folder's {len(latents)} explanations{left}; "
                f"score them: autointerp materialize 'scores/*' --coder {coder} --shard {shard}"
            )


def run_demo(deployment, force: bool) -> None:
    from dagster import AssetKey, DagsterInstance

    from assets.partitions import coders_of, shard_partitions
    from autointerp_defs.definitions import definitions_for
    from autointerp_defs.sensors import new_shard_keys
    from resources.sparse_coders import scan_registry
    from storage.layout import DataRoot
    from storage.store import TableStore

    started = time.perf_counter()
    data_dir = deployment.data_dir
    root = DataRoot.at(data_dir)
    register_embedded(data_dir)
    defs = definitions_for(deployment)
    home, _ = instance_home()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = DagsterInstance.from_config(str(home))
    coders = scan_registry(root.registry_dir)
    known = set(coders_of(instance.get_dynamic_partitions(shard_partitions.name)))
    broken: dict[str, str] = {}
    keys, _ = new_shard_keys(
        root.registry_dir,
        [c for c in coders if c not in known],
        deployment.latents_per_shard,
        broken,
    )
    if broken:
        raise SystemExit(f"registry folders that are not coders: {broken}")
    instance.add_dynamic_partitions(shard_partitions.name, keys)
    coder = f"{DEMO_CODER_NAME}/{DEMO_HOOKPOINT}"

    def done(asset: str, partition: str | None) -> bool:
        if force:
            return False
        key = AssetKey.from_user_string(asset)
        if partition is None:
            return instance.get_latest_materialization_event(key) is not None
        return partition in instance.get_materialized_partitions(key)

    scorers = [f"scores/{name}" for name in deployment.automated_scorers]
    steps = [(["corpus"], None), (["activations"], f"{coder}|{DEMO_SHARDS[0]}")]
    steps += [
        (["exemplars", "explanations", *scorers], f"{coder}|{shard}") for shard in DEMO_SHARDS
    ]
    steps += [(["score_summary"], None)]
    failed_shards = {}
    for selection, partition in steps:
        if selection != ["score_summary"] and all(
            done(a, partition) for a in selection
        ):  # the summary rebuilds only stale coders: always ask
            print(f"reusing {', '.join(selection)} {partition or ''}")
            continue
        print(f"materializing {', '.join(selection)} {partition or ''}", flush=True)
        if (failure := _materialize(selection, partition, instance, defs)) is None:
            continue
        if "explanations" not in selection:
            # the corpus, the cache or the summary: nothing after it can run
            raise SystemExit(
                f"materializing {', '.join(selection)} {partition or ''} failed: {failure}"
            )
        # one shard's latents the embedded model could not explain: the other shard still shows the pipeline
        failed_shards[partition] = failure
        print(f"{partition} failed: {failure}", flush=True)
    if len(failed_shards) == len(DEMO_SHARDS):
        raise SystemExit(
            f"every demo shard failed: {failed_shards}. The embedded 135M model is the likely "
            "cause (its answers are often unreadable); a hosted or self-hosted model "
            "(README: Explainers and LLM clients) does not have this problem."
        )
    print_results(TableStore(root), coder, deployment.scorers)
    if (
        why := no_verdict(TableStore(root), coder, DEMO_SHARDS, deployment.automated_scorers)
    ) is not None:
        print(f"\nNO VERDICT: {why}")
    for partition, failure in failed_shards.items():
        print(f"\nNOT DONE: {partition} failed, and is not in the table above: {failure[:600]}")
        print(
            "The embedded 135M model's answers are often unreadable; they are refused, never "
            "guessed. Retry that shard with a hosted or self-hosted model "
            "(README: Explainers and LLM clients)."
        )
    print(
        f"\ndemo finished in {time.perf_counter() - started:.0f} s"
        f"{f' with {len(failed_shards)} of {len(DEMO_SHARDS)} shards failed' if failed_shards else ''}"
    )
    for line in next_steps(deployment, home, coder, scorers):
        print(line)


def next_steps(deployment, home: Path, coder: str, scorers: list[str]) -> list[str]:
    """The commands that go on from the demo: the latent browser on its coder, the Dagster UI, re-scoring."""
    from assets.links import coder_url

    here = f".venv/bin/autointerp --deployment {deployment.path} --data {deployment.data_dir}"
    return [
        f"Open the latent browser: make view   (then {coder_url(coder, deployment.setting('viewer_url'))})",
        f"  (this data root:       {here} view)",
        "Open the UI:             make ui     (then http://127.0.0.1:3000)",
        f"Re-score from the shell: DAGSTER_HOME={home} {here} materialize {','.join(scorers)} "
        f"--coder {coder} --shard {DEMO_SHARDS[0]}",
    ]


def print_results(store, coder: str, scorers: dict) -> None:
    """The summary of `coder` in the `store` (a `storage.store.TableStore`): each scorer beside its control,
    the verdicts, and which models made the results."""
    import pandas as pd

    from assets.score_metrics import beside_control, paired_means, verdict
    from assets.stability import reseed_stability, stability_line

    table = store.score_summary(coder).read_if_present()
    if table is None:
        print("no scores yet")
        return
    present = [name for name in scorers if name in table.columns]
    tops = top_tokens(store, coder, sorted(set(table["shard"])) if "shard" in table else [])
    shown = pd.DataFrame(
        {
            "latent": table["latent"],
            "top tokens": [tops.get(int(latent), "") for latent in table["latent"]],
            "explanation": table["explanation"].str.slice(0, 60),
        }
    )
    for name in present:
        shown[name] = [
            beside_control(s, c, digits=2)
            for s, c in zip(table[name], table[f"{name}_control"], strict=False)
        ]
    several = int((table["senses"] > 1).sum()) if "senses" in table else 0
    if several:
        shown["senses"] = table["senses"]
        for name in [n for n in present if f"{n}_min_sense" in table]:
            shown[f"{name} lowest sense"] = table[f"{name}_min_sense"].round(2)
    metrics = ", ".join(f"{name}: {scorers[name].main_metric}" for name in present)
    print(
        "\nEach latent's top tokens (those it fires on most strongly on average) beside its explanation, "
        "so you can judge the text;\nthen each scorer's main metric "
        f"({metrics}) for the explanation / for its control (another latent's explanation):"
    )
    print(shown.to_string(index=False))
    if "senses" not in table:
        print(
            "this summary was written before it counted each latent's senses: materialize `score_summary` to add them"
        )
    elif several:
        print(
            f"latents with several senses: {several} (`senses`); "
            "`<scorer> lowest sense` is the score of the worst one "
            "(NaN: a sense without a score of its text)"
        )
    for name in present:
        mean, control, paired = paired_means(table[name], table[f"{name}_control"])
        means = (
            f"mean {beside_control(mean, control)} over the {paired} latents with a control"
            if paired
            else f"mean {beside_control(mean, control)}"
        )
        print(
            f"{name}: {means}; {verdict(table[f'{name}_gap'], scorers[name].control_description())}"
        )
        if f"{name}_reseed" in table:  # `[explanations] stability_latents`
            said = reseed_stability(
                table[name], table[f"{name}_reseed"], table["reseed_similarity"]
            )
            print(f"{name}, explained again from other windows: {stability_line(said)}")
    if stale := table.loc[table["stale"] != "", "latent"].tolist() if "stale" in table else []:
        print(
            f"latents {stale[:10]}: some scores were made with an earlier explanation and are "
            "left out (re-run those scorers)"
        )
    for line in made_by(store, coder, sorted(set(table["shard"])), present):
        print(line)


def no_verdict(store, coder: str, shards, scorers) -> str | None:
    """Why fewer than `DEMO_LATENTS_WITH_CONTROL` latents of `coder` have a score beside a control, in plain
    words; None when a scorer has that many. Counts what the `shards` asked of the explainer, which is
    where latents are lost."""
    from assets.score_metrics import paired_means

    table = store.score_summary(coder).read_if_present()
    paired = max(
        (
            paired_means(table[name], table[f"{name}_control"])[2]
            for name in scorers
            if table is not None and name in table
        ),
        default=0,
    )
    if paired >= DEMO_LATENTS_WITH_CONTROL:
        return None
    frames = [
        frame
        for shard in shards
        if (frame := store.explanations(coder, shard).read_if_present()) is not None
    ]
    asked = sum(len(frame) for frame in frames)
    readable = sum(int((frame["status"] == "ok").sum()) for frame in frames)
    return (
        f"{paired} latents have a score beside a control, and the demo needs "
        f"{DEMO_LATENTS_WITH_CONTROL} for a verdict worth reading. "
        f"The demo asked for {asked} explanations ({len(frames)} of {len(shards)} shards wrote theirs); "
        f"{asked - readable} of the answers could not be read (refused, never guessed), and a latent "
        "needs a readable explanation in a shard with another one to get a control. More latents per "
        "shard ([settings] max_latents_per_shard) cost more minutes on this CPU; a hosted or "
        "self-hosted model (README: Explainers and LLM clients) answers readably."
    )


def top_tokens(store, coder: str, shards: list[str], n: int = 4) -> dict[int, str]:
    """Latent → its `n` tokens of highest mean activation (the exemplars' `latent_profiles`), quoted so that a
    leading space shows; empty where the profiles or the corpus's vocabulary are not there."""
    from assets.prompts import quoted
    from autointerp_defs.readside.reader import NotMaterialized, display_vocab, latent_profiles

    profiles = latent_profiles(store, coder, shards)
    if not len(profiles):
        return {}
    try:
        vocab = display_vocab(store)
    except NotMaterialized:
        return {}
    return {
        int(row.latent): " ".join(quoted(vocab[int(t)]) for t in list(row.top_tokens)[:n])
        for row in profiles.itertuples()
    }


def made_by(store, coder: str, shards: list[str], scorers: list[str]) -> list[str]:
    """Which models made the printed results, as the tables themselves record them."""

    def recorded(tables, column) -> str:
        frames = [frame for table in tables if (frame := table.read_if_present()) is not None]
        found = {value for frame in frames if column in frame for value in frame[column] if value}
        return ", ".join(sorted(found)) or "not recorded"

    lines = [
        f"explained by {recorded([store.explanations(coder, shard) for shard in shards], 'model')}"
    ]
    lines += [
        f"{name} scored by {recorded([store.scores(coder, shard, name) for shard in shards], 'models')}"
        for name in scorers
    ]
    return lines


def cache(
    data_dir: str,
    coder_keys: list[str],
    batch_size: int,
    checkpoint_entries: int,
    latents_per_shard: int,
    coordination_url: str = "",
) -> None:
    """Cache activations outside Dagster (same code as the asset, under the same lock: the deployment's
    `coordination_url`), e.g. on a GPU box or in tests."""
    from assets.activations import cache_activations
    from resources.sparse_coders import load_registered
    from resources.subject_model import SubjectModelResource
    from storage.layout import DataRoot

    root = DataRoot.at(data_dir)
    coders = [load_registered(root.registry_dir, key) for key in coder_keys]
    metas = cache_activations(
        coders,
        SubjectModelResource(batch_size=batch_size),
        root,
        checkpoint_entries=checkpoint_entries,
        latents_per_shard=latents_per_shard,
        log=print,
        coordination_url=coordination_url,
    )
    for key, meta in metas.items():
        print(
            f"{key}: {meta['tokens']} tokens, {meta['live_latents']} live latents, "
            f"mean L0 {meta['mean_l0']:.1f}, FVU {meta['fvu']}"
        )


def steer(
    data_dir: str,
    subject,
    coder_key: str,
    latent: int,
    prompt: str,
    strength: float,
    tokens: int,
    absolute: bool,
    width: int = 100,
) -> None:
    """Print the prompt's unsteered and steered continuations side by side. Strength is in units of the
    latent's largest cached activation unless `absolute` (then in the coder's own units). `subject` is the
    deployment's subject-model resource."""
    import textwrap

    from resources.sparse_coders import load_registered
    from resources.steering import continue_side_by_side, max_activation
    from storage.layout import DataRoot

    root = DataRoot.at(data_dir)
    coder = load_registered(root.registry_dir, coder_key)
    unit = 1.0 if absolute else max_activation(root.activations_dir(coder_key), latent)
    result = continue_side_by_side(
        subject.steerer(), coder, latent, prompt, strength * unit, tokens
    )
    plain, steered, kl = result.unsteered, result.steered, result.kl
    how = (
        f"+{strength:g} in the coder's units"
        if absolute
        else f"+{strength:g} × max cached activation {unit:.4g} = +{strength * unit:.4g}"
    )
    print(f"prompt: {prompt!r}")
    print(
        f"steering {coder_key} latent {latent}: {how} at every position (next-token KL {kl:.3f} nats)"
    )
    column = max(20, (width - 3) // 2)
    left, right = (
        textwrap.wrap(text.replace("\n", "↵"), column) or [""] for text in (plain, steered)
    )
    print(f"{'unsteered':<{column}} | steered")
    print(f"{'-' * column} | {'-' * column}")
    for i in range(max(len(left), len(right))):
        print(
            f"{left[i] if i < len(left) else '':<{column}} | {right[i] if i < len(right) else ''}"
        )


def search(data_dir: str, query: str, limit: int, embedder) -> None:
    """Semantic search with the deployment's `embedder`, over the explanations table of its vectors."""
    from storage.store import TableStore
    from storage.vector_store import search_explanations

    store = TableStore.at(data_dir)
    hits = search_explanations(store, embedder.model, embedder.embed([query])[0], limit)
    for hit in hits:
        print(
            f"{hit['_distance']:.3f}  {hit['coder']}  latent {hit['latent']}: {hit['explanation']}"
        )
    if not hits:
        print(
            f"no explanation under {store.layout.root} is in the search index of this "
            f"deployment's embedder ({embedder.model!r}) yet: `make demo` "
            "(or a materialized `explanations` partition) stores some; "
            "--data names another data root"
        )


def subject_model_of(deployment) -> tuple[str, str | None]:
    """The deployment's subject model as (model, gguf_file): whose unembedding the logit lens reads."""
    model = deployment.resources()["subject_model"]
    return model.model, model.gguf_file


def print_scores(store, coder: str, scorers: dict, as_json: bool = False) -> None:
    """`autointerp scores`: per scorer of `coder`, the means over latents with their 95 % intervals and
    the verdict, after where every latent of the coder went (`assets/accounting.py`); with `as_json`, the
    same as one JSON object."""
    import json
    import math

    from assets.accounting import accounting_lines, coder_accounting
    from assets.scores import coder_summary
    from assets.stability import stability_line

    table = store.score_summary(coder).read_if_present()
    if table is None:
        raise CommandError(
            f"no score summary for {coder}: materialize `score_summary` (or run `autointerp demo`) first"
        )
    summary = coder_summary(table, scorers)
    accounted = coder_accounting(store, coder)
    if as_json:

        def plain(value):  # JSON has no NaN: an undefined number is null
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list):
                return [plain(v) for v in value]
            return None if isinstance(value, float) and math.isnan(value) else value

        latents = int(table["latent"].nunique())
        said = {"coder": coder, "latents": latents, "scorers": plain(summary)}
        print(json.dumps(said | {"accounting": accounted}))
        return
    print(f"{coder}: {table['latent'].nunique()} latents scored")
    for line in accounting_lines(accounted) if accounted else []:
        print(line)
    for name, said in summary.items():
        print(
            f"{name} ({said['main_metric']}), over {said['with_control']} latents with a control:"
        )
        for part in ("mean", "control", "gap"):
            lo, hi = said[f"{part}_interval"]
            print(f"  {part:<8} {said[part]:.3f} [{lo:.3f}, {hi:.3f}]")
        print(f"  {said['verdict']}")
        if "stability" in said:  # `[explanations] stability_latents`
            print(f"  reseeded: {stability_line(said['stability'])}")


EXPORT_FLAGS = {"neuronpedia": ("model_id", "set_name", "layer", "batch_mb"), "delphi": ("module",)}
"""The `export` options of one format each."""


def export_to(args, deployment) -> None:
    """`autointerp export`: each step and count as it goes, then where it wrote and how to import it."""
    for fmt, flags in EXPORT_FLAGS.items():
        given = [f"--{flag.replace('_', '-')}" for flag in flags if getattr(args, flag) is not None]
        if fmt != args.format and given:
            raise CommandError(
                f"{given[0]} applies to `export {fmt}` only, not `export {args.format}`. Fix: leave it out"
            )

    def say(line: str) -> None:
        print(line, flush=True)

    if args.format == "neuronpedia":
        from autointerp_defs.readside.neuronpedia import BATCH_BYTES, export_neuronpedia

        export_neuronpedia(
            args.data,
            args.coder,
            args.dir,
            model_id=args.model_id,
            set_name=args.set_name,
            layer=args.layer,
            subject_model=subject_model_of(deployment),
            batch_bytes=int(args.batch_mb * 2**20) if args.batch_mb is not None else BATCH_BYTES,
            say=say,
        )
    else:
        from autointerp_defs.readside.delphi import export_delphi

        subject = deployment.resources()["subject_model"]
        export_delphi(
            args.data,
            args.coder,
            args.dir,
            args.module,
            (subject.model, subject.gguf_file, subject.revision),
            say,
        )


def view_latents(deployment, host: str, port: int | None) -> None:
    """`autointerp view`: the latent browser with the deployment's embedder (search), subject model
    (logit lens, steering box) and Dagster URL (links to partitions)."""
    from urllib.parse import urlsplit

    from autointerp_defs.readside.server import serve

    resources = deployment.resources()
    settings = resources["settings"]
    port = port if port is not None else (urlsplit(settings.viewer_url).port or 8080)
    check_port_free(
        host, port, "VIEW_PORT=N; [settings] viewer_url is where Dagster's metadata links"
    )
    serve(
        deployment.data_dir,
        host,
        port,
        viewer_url=settings.viewer_url,
        embedder=resources["embedder"],
        dagster_url=settings.dagster_url,
        subject=resources["subject_model"],
    )


def check_port_free(host: str, port: int, make_option: str) -> None:
    """Stop with the fix when another process listens on `host`:`port` (another viewer or UI, most often)."""
    import errno
    import socket

    with socket.socket() as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as the servers bind: a port left in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise CommandError(
                f"port {port} on {host} is in use (another `autointerp view` or `make ui`?). "
                "Fix: stop that process, or pick another port with --port N "
                f"(make: {make_option})"
            ) from None


def main(argv: list[str] | None = None) -> None:
    """The command line; a mistake the user can fix ends with its one-line message, not a traceback."""
    from assets.explainers.delphi_folder import DelphiFolderError
    from autointerp_defs.deployments import DeploymentError
    from autointerp_defs.readside.reader import ExportInputError
    from resources.hookpoints import UnknownHookpointError
    from resources.sparse_coders import CoderFormatError, CoderShapeError, RegistryError
    from resources.steering import SteeringError
    from storage.atomic import LockedError
    from storage.coordination import LeaseLost

    try:
        return _main(argv)
    except (
        CommandError,
        DeploymentError,
        LockedError,
        LeaseLost,
        RegistryError,
        CoderFormatError,
        CoderShapeError,
        PermissionError,
        ExportInputError,
        DelphiFolderError,
        SteeringError,
        UnknownHookpointError,
    ) as error:
        sys.exit(f"autointerp {' '.join(argv if argv is not None else sys.argv[1:])}: {error}")


def _main(argv: list[str] | None = None) -> None:
    from assets.automation import WORKER_QUEUES
    from autointerp_defs.deployments import dagster_home, load_deployment

    parser = argparse.ArgumentParser(prog="autointerp", description=__doc__)
    parser.add_argument(
        "--deployment",
        default=None,
        help="deployment name (deployments/<name>.toml) or TOML path (default $AUTOINTERP_DEPLOYMENT or local)",
    )
    parser.add_argument(
        "--data", default=None, help="data root (default: the deployment's [settings] data_dir)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "register-embedded", help="train the demo TopK SAE on the embedded model and register it"
    )
    registering = commands.add_parser(
        "register",
        help="register sparse coders from a Hugging Face repo, a SAELens release or a local "
        "folder (README: Registering coders)",
    )
    registering.add_argument(
        "source",
        help="a local folder, a SAELens release (e.g. gpt2-small-res-jb), "
        "or a Hugging Face repo id (e.g. EleutherAI/sae-pythia-70m-32k)",
    )
    registering.add_argument(
        "--hookpoints",
        nargs="+",
        metavar="ID[=MODULE]",
        help="which coders: folders of the repo or folder (layers.3), or SAE ids of a release; "
        "=MODULE names the subject model's module it reads where the source does not say "
        "(default: the one source holds)",
    )
    registering.add_argument(
        "--name",
        help="the coders' name in the registry (default: the repo's or folder's last part, or the release)",
    )
    registering.add_argument(
        "--revision",
        help="a branch, tag or commit of the hub repo (default main); the commit is recorded beside the coder",
    )
    demo = commands.add_parser(
        "demo", help="register, cache, explain and score the demo partitions, then print a table"
    )
    demo.add_argument(
        "--force", action="store_true", help="re-materialize partitions that already exist"
    )
    run = commands.add_parser(
        "materialize",
        help="materialize assets of one coder × shard partition in this process, on the instance at $DAGSTER_HOME "
        "(default ./.dagster_home), as the demo does",
    )
    run.add_argument(
        "selection",
        help="asset names, comma-separated; * matches any text, e.g. 'scores/*' or exemplars,explanations",
    )
    run.add_argument("--coder", help="coder key, e.g. smollm2-topk/model.layers.15")
    run.add_argument("--shard", help="the coder's shard, e.g. 00 (or 0)")
    run.add_argument(
        "--partition", help="or the partition key itself, e.g. 'smollm2-topk/model.layers.15|00'"
    )
    caching = commands.add_parser(
        "cache", help="cache activations of registered coders in one pass (resumes a killed run)"
    )
    caching.add_argument(
        "coders", nargs="+", help="coder partition keys, e.g. smollm2-topk/model.layers.15"
    )
    caching.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="sequences per forward pass (0 = from free GPU memory)",
    )
    caching.add_argument(
        "--checkpoint-entries", type=int, default=1 << 20, help="buffered pairs per checkpoint"
    )
    setup = commands.add_parser(
        "instance",
        help="write $DAGSTER_HOME/dagster.yaml: run limits for this machine, no new-user dialog",
    )
    setup.add_argument("--max-runs", type=int, default=2, help="runs in progress at once")
    setup.add_argument(
        "--llm-runs",
        type=int,
        default=2,
        help="runs waiting on the LLM at once (explanations, LLM scorers); with --cluster: steps",
    )
    setup.add_argument(
        "--cluster",
        action="store_true",
        help="the cluster's instance, on the PostgreSQL at $AUTOINTERP_POSTGRES_URL; "
        "its pools limit steps (README: Scale out)",
    )
    setup.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="with --cluster: subject-model steps at once, all nodes together (one per GPU)",
    )
    work = commands.add_parser(
        "worker", help="a cluster worker: runs the steps sent to one queue (README: Scale out)"
    )
    work.add_argument(
        "--queue",
        required=True,
        choices=sorted(set(WORKER_QUEUES.values())),
        help="gpu: subject-model steps; cpu: corpus, exemplars, summary, embedding; llm: explanations, LLM scorers",
    )
    work.add_argument(
        "--gpu",
        type=int,
        default=None,
        help="gpu queue: the GPU this worker uses (its CUDA_VISIBLE_DEVICES); start one worker per GPU",
    )
    work.add_argument(
        "--concurrency", type=int, default=None, help="steps at once (default: gpu 1, cpu 1, llm 4)"
    )
    work.add_argument(
        "--name",
        default=None,
        help="the worker's name (default: the queue, or gpu<N>, @ the host name)",
    )
    ui = commands.add_parser(
        "ui",
        help="the Dagster UI and daemon on $DAGSTER_HOME (what `dagster dev` does, without its supersession warning)",
    )
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    steering = commands.add_parser(
        "steer", help="continue a prompt with and without one latent steered, side by side"
    )
    steering.add_argument("coder", help="coder key, e.g. smollm2-topk/model.layers.15")
    steering.add_argument("latent", type=int)
    steering.add_argument("prompt")
    steering.add_argument(
        "--strength",
        type=float,
        default=2.0,
        help="added to the latent at every position, in units of its max cached activation (default 2)",
    )
    steering.add_argument("--tokens", type=int, default=32, help="tokens to generate (default 32)")
    steering.add_argument(
        "--absolute",
        action="store_true",
        help="strength in the coder's own units (no activation cache needed)",
    )
    view = commands.add_parser(
        "view",
        help="the latent browser (coders, latents, latent pages) from the data root, "
        "on the port of [settings] viewer_url (8080)",
    )
    view.add_argument("--host", default="127.0.0.1")
    view.add_argument(
        "--port",
        type=int,
        default=None,
        help="default: the port of the deployment's [settings] viewer_url, where Dagster's links point",
    )
    scores = commands.add_parser(
        "scores",
        help="a coder's score summary: each scorer's mean, its control's and the gap, with intervals",
    )
    scores.add_argument("coder", help="coder partition key, e.g. smollm2-topk/model.layers.15")
    scores.add_argument("--json", action="store_true", help="print it as JSON")
    export = commands.add_parser("export", help="write a coder's latents in another tool's format")
    export.add_argument("format", choices=["neuronpedia", "delphi"])
    export.add_argument("coder", help="coder partition key, e.g. smollm2-topk/model.layers.15")
    export.add_argument(
        "dir", help="output folder: each export writes <dir>/<model>/<its folder> and prints it"
    )
    export.add_argument(
        "--model-id", help="neuronpedia: the model's id there (default: the subject model's name)"
    )
    export.add_argument(
        "--set-name", help="neuronpedia: the source set name (default: the coder's name)"
    )
    export.add_argument(
        "--layer",
        type=int,
        help="neuronpedia: the layer its source id starts with (default: read from the hookpoint, e.g. model.layers.3)",
    )
    export.add_argument(
        "--batch-mb",
        type=float,
        help="neuronpedia: the most MiB of JSON in one batch file (default: 100)",
    )
    export.add_argument(
        "--module", help="delphi: the module name in file names (default: the hookpoint)"
    )
    importing = commands.add_parser(
        "import",
        help="materialize a coder's explanations from another tool's (on the instance at $DAGSTER_HOME, "
        "as materialize does), to be scored here with controls",
    )
    importing.add_argument("format", choices=["delphi"])
    importing.add_argument("coder", help="coder partition key, e.g. smollm2-topk/model.layers.15")
    importing.add_argument(
        "dir", help="delphi's run folder (holding explanations/) or its explanations folder"
    )
    importing.add_argument(
        "--module", help="which module's explanations, when the folder holds several"
    )
    importing.add_argument("--model", default="delphi", help="the explainer model's name to record")
    commands.add_parser(
        "adopt-root",
        help="make this data root the one the instance's runs use "
        "(with [settings] shared_data_root: after moving or replacing the shared root)",
    )
    labelling = commands.add_parser(
        "label-graph",
        help="label the features of an attribution graph JSON (circuit-tracer's) with the coders' explanations",
    )
    labelling.add_argument("graph", help="the graph JSON, e.g. circuit-tracer's <slug>.json")
    labelling.add_argument(
        "--coder",
        required=True,
        help="a coder key (its layer's features), or a coder name such as smollm2-topk (its coder of each layer)",
    )
    labelling.add_argument("--out", help="where to write the labelled graph (default: over GRAPH)")
    calibrating = commands.add_parser(
        "calibrate",
        help="the judge's calibration card: planted-truth latents explained and scored as real ones, "
        "once per judge",
    )
    calibrating.add_argument(
        "--latents-per-class", type=int, default=2, help="planted latents per class (default 2)"
    )
    calibrating.add_argument(
        "--random-latents", type=int, default=4, help="latents firing at random (default 4)"
    )
    calibrating.add_argument(
        "--force", action="store_true", help="make the card again though this judge has one"
    )
    find = commands.add_parser("search", help="semantic search over stored explanations")
    find.add_argument("query")
    find.add_argument("--limit", type=int, default=10)
    args = parser.parse_args(argv)
    deployment = load_deployment(
        args.deployment, {"settings": {"data_dir": args.data}} if args.data else None
    )
    args.data = deployment.data_dir
    if args.command == "register-embedded":
        register_embedded(args.data)
    elif args.command == "register":
        register_coders(
            args.data,
            args.source,
            args.hookpoints,
            args.name,
            args.revision,
            deployment.latents_per_shard,
        )
    elif args.command == "demo":
        run_demo(deployment, args.force)
    elif args.command == "materialize":
        materialize_selection(deployment, args.selection, args.partition, args.coder, args.shard)
    elif args.command == "instance":
        from autointerp_defs.deployments import is_set
        from autointerp_defs.instance import POSTGRES_ENV, write_instance

        if args.cluster and not is_set(POSTGRES_ENV):
            raise CommandError(
                f"{POSTGRES_ENV} is not set. Fix: export "
                f"{POSTGRES_ENV}=postgresql+psycopg2://<user>:<password>@<db-host>:5432/<database>, "
                "on every node (README: Scale out)"
            )
        gpus = args.gpus if args.cluster else None
        print(f"wrote {write_instance(instance_home()[0], args.max_runs, args.llm_runs, gpus)}")
    elif args.command == "worker":
        from autointerp_defs.cluster import run_worker
        from autointerp_defs.deployments import select_for_this_process

        select_for_this_process(deployment)
        run_worker(deployment, args.queue, args.concurrency, args.gpu, args.name)
    elif args.command == "ui":
        from autointerp_defs.ui import serve

        check_port_free(
            args.host,
            args.port,
            "UI_PORT=N; [settings] dagster_url is where the latent browser links",
        )
        sys.exit(serve(args.host, args.port))
    elif args.command == "cache":
        cache(
            args.data,
            args.coders,
            args.batch_size,
            args.checkpoint_entries,
            deployment.latents_per_shard,
            deployment.setting("coordination_url"),
        )
    elif args.command == "steer":
        steer(
            args.data,
            deployment.resources()["subject_model"],
            args.coder,
            args.latent,
            args.prompt,
            args.strength,
            args.tokens,
            args.absolute,
        )
    elif args.command == "search":
        search(args.data, args.query, args.limit, deployment.resources()["embedder"])
    elif args.command == "export":
        export_to(args, deployment)
    elif args.command == "label-graph":
        from autointerp_defs.readside.graph_labels import label_graph

        counts = label_graph(
            args.data, args.graph, args.coder, args.out, subject_model_of(deployment)[0]
        )
        print(
            f"wrote {args.out or args.graph}: "
            + ", ".join(f"{n} {kind}" for kind, n in counts.items())
        )
    elif args.command == "calibrate":
        calibrate_judge(deployment, args.latents_per_class, args.random_latents, args.force)
    elif args.command == "import":
        import_delphi(deployment, args.coder, args.dir, args.module, args.model)
    elif args.command == "view":
        view_latents(deployment, args.host, args.port)
    elif args.command == "scores":
        print_scores(
            deployment.resources()["settings"].store, args.coder, deployment.scorers, args.json
        )
    elif args.command == "adopt-root":
        from dagster import DagsterInstance

        from resources.settings import adopt_root
        from storage.layout import DataRoot

        if dagster_home() is None:
            raise SystemExit(
                "autointerp adopt-root: DAGSTER_HOME is not set. "
                "Fix: set it to the instance's folder (its dagster.yaml names the shared database)."
            )
        identity = adopt_root(
            DagsterInstance.get(), DataRoot.at(args.data), deployment.setting("coordination_url")
        )
        print(
            f"the instance's runs now use the data root {DataRoot.at(args.data).root} (identity {identity})"
        )


if __name__ == "__main__":
    sys.exit(main())
