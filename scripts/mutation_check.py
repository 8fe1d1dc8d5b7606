"""Mutation check: break one rule at a time on purpose and show that a named test notices.

    .venv/bin/python scripts/mutation_check.py              # every mutation (a few minutes on a quiet 2-core machine)
    .venv/bin/python scripts/mutation_check.py --jobs 2     # two at a time
    .venv/bin/python scripts/mutation_check.py --only ditto_lambda_zero --only erk_inverse_sqrt
    .venv/bin/python scripts/mutation_check.py --list       # names, files and why

Each mutation replaces one exact piece of text of one source file in a scratch copy of the tree (src/, tests/,
pyproject.toml; the real tree is never written), then runs only the test files it names (`file` or `file::test`)
with `python -m pytest -x -q -n 0` and PYTHONPATH=<scratch>/src, under the same tests/conftest.py as the suite. A
mutation is "killed" when those tests fail, "survived" when they pass. First the named tests run once on an
unmutated copy (the baseline): a mutation only counts as killed by tests that pass without it.

Exit status 1 if any mutation survives, any baseline test fails, a test run errors (no tests collected, a bad test
id), or a mutation's old text is not found exactly once in its file (a refactor made it stale: update its text).

Not every change is a fault a test can see: a mutation that computes the same thing another way (an equivalent
mutant) survives by right. Examples met while writing this list: dropping the mask after the optimizer step alone
(the gradient is masked before it, so plain SGD leaves inactive weights at 0 either way), and orbax's
`cleanup_tmp_directories=False` (orbax still removes the leftover of an interrupted save when it writes that step
again). Such a mutation is left out, or replaced by one that does change the rule.

Adding a mutation: every new algorithm or rule adds at least one entry to MUTATIONS, naming the smallest, fastest test
that must kill it (a hand-derived reference, not a test that compares the code with itself), and a one-line why.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
COPIED = ("src", "tests", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  file: str  # relative to src/fedspa_jax
  old: str
  new: str
  tests: tuple[str, ...]  # relative to tests/: "test_x.py" or "test_x.py::test_y"
  why: str


M = Mutation
MUTATIONS = [
    # --- the three rules the audit found unguarded -----------------------------------------------------------------
    M("fedspa_regrow_at_x0", "algorithms/fedspa.py",
      "result.params, data, k_grad,", "x0, data, k_grad,",
      ("test_references.py::test_fedspa_client_step_by_hand",),
      "FedSpa regrows by the dense gradient at the trained point, not at the round's starting model x0"),
    M("erk_inverse_sqrt", "masks.py",
      "raw = {i: (sum(np.shape(leaves[i][1])) / sizes[i]) ** power_scale for i in masked}",
      "raw = {i: (1.0 / np.sqrt(sizes[i])) ** power_scale for i in masked}",
      ("test_references.py::test_erk_ratios_follow_the_formula",),
      "ERK's layer density is proportional to (sum of dims) / (product of dims)"),
    M("ditto_lambda_zero", "algorithms/dense.py",
      "return 0.5 * ditto_lambda * sum(", "return 0.0 * ditto_lambda * sum(",
      ("test_references.py::test_ditto_personal_steps_by_hand",),
      "Ditto's personal step is v - lr (grad f(v) + lambda (v - w)) with lambda > 0"),
    # --- FedSpa's client: masked training, drop and grow, the update ------------------------------------------------
    M("train_outside_the_mask", "client.py",
      "mask_tree = apply_mask if mask is not None else (lambda tree, _: tree)", "mask_tree = lambda tree, _: tree",
      ("test_references.py::test_fedspa_client_step_by_hand",),
      "sparse-to-sparse training: coordinates outside the mask stay exactly 0"),
    M("fedspa_update_from_w", "algorithms/fedspa.py",
      "update = jax.tree.map(jnp.subtract, x0, result.params)", "update = jax.tree.map(jnp.subtract, w, result.params)",
      ("test_references.py::test_fedspa_client_step_by_hand",),
      "U_k = x0 - x_final is sparse: 0 off the client's mask"),
    M("drop_count_floor", "mask_update.py",
      "jnp.ceil(rate * active.astype(jnp.float32))", "jnp.floor(rate * active.astype(jnp.float32))",
      ("test_mask_update.py::test_drop_count_is_ceil_of_rate_times_active",),
      "a leaf drops ceil(rate * active) weights"),
    M("grow_smallest_gradient", "mask_update.py",
      "jnp.where(~k, _INF_BITS - _magnitude_keys(g), _NO)", "jnp.where(~k, _magnitude_keys(g), _NO)",
      ("test_mask_update.py::test_drop_smallest_magnitudes_grow_largest_gradients",),
      "RigL grows the inactive weights of largest |gradient|"),
    M("drop_largest_magnitude", "mask_update.py",
      "[jnp.where(m, _magnitude_keys(p), _NO) for m, p in zip(masks, params)]",
      "[jnp.where(m, _INF_BITS - _magnitude_keys(p), _NO) for m, p in zip(masks, params)]",
      ("test_references.py::test_fedspa_client_step_by_hand",),
      "FedSpa drops the active weights of smallest |x| at the trained point"),
    M("cosine_schedule_half_period", "mask_update.py",
      "jnp.cos(jnp.pi * t / t_end)", "jnp.cos(0.5 * jnp.pi * t / t_end)",
      ("test_mask_update.py::test_cosine_prune_rate_values",),
      "alpha_t = alpha / 2 (1 + cos(pi t / T_end))"),
    M("erk_no_cap", "masks.py",
      "too_dense = [i for i in sparse if eps * raw[i] > 1.0]", "too_dense = [i for i in sparse if eps * raw[i] > 1e9]",
      ("test_references.py::test_erk_caps_a_small_layer_at_one_and_rescales_the_rest",),
      "ERK makes a layer dense when its density would exceed 1 and rescales the rest (RigL)"),
    M("target_count_floor", "masks.py",
      "max(1, int(round(d * int(np.prod(np.shape(leaf))))))", "max(1, int(d * int(np.prod(np.shape(leaf)))))",
      ("test_references.py::test_target_counts_are_rounded_by_hand",),
      "a layer keeps round(d * n) active weights"),
    # --- server: aggregation weights, masked_mean, server_lr -------------------------------------------------------
    M("server_lr_ignored", "algorithms/base.py",
      "server_optimizer = optax.sgd(common.server_lr)", "server_optimizer = optax.sgd(1.0)",
      ("test_references.py::test_fedspa_client_step_by_hand",),
      "the server step is w - server_lr * aggregate(U)"),
    M("mean_ignores_weights", "server.py",
      "jnp.tensordot(weights.astype(u.dtype), u, axes=1)",
      "jnp.tensordot((weights > 0).astype(u.dtype), u, axes=1)",
      ("test_references.py::test_masked_mean_by_hand",),
      "mean aggregation weights each client's update by its weight (sample counts under 'samples')"),
    M("masked_mean_is_mean", "server.py",
      "wc = jnp.where(c, weights.reshape((-1,) + (1,) * (u.ndim - 1)), 0.0)",
      "wc = jnp.where(c | True, weights.reshape((-1,) + (1,) * (u.ndim - 1)), 0.0)",
      ("test_references.py::test_masked_mean_by_hand",),
      "masked_mean averages each coordinate over the clients whose mask covered it"),
    M("weighting_swapped", "round.py",
      'return count.astype(jnp.float32) if weighting == "samples" else (count > 0).astype(jnp.float32)',
      'return (count > 0).astype(jnp.float32) if weighting == "samples" else count.astype(jnp.float32)',
      ("test_fedspa.py::test_sample_weighting_is_an_option",),
      "weighting='samples' weighs a client by its sample count, 'uniform' by 1"),
    # --- cohorts ---------------------------------------------------------------------------------------------------
    M("cohort_sampling_biased", "population.py",
      "(), 0, j + 1, dtype=jnp.int32)", "(), 0, j, dtype=jnp.int32)",
      ("test_round.py::test_cohort_sampling_is_a_uniform_subset",),
      "Floyd's algorithm draws t uniform in [0, j]: every client is sampled with probability S / K"),
    # --- the other algorithms --------------------------------------------------------------------------------------
    M("ditto_personal_from_w", "algorithms/dense.py",
      "personal = local_train(\n          v, None,", "personal = local_train(\n          w, None,",
      ("test_references.py::test_ditto_personal_steps_by_hand",),
      "Ditto's personal model continues from its own v, not from the global w"),
    M("fedrep_body_first", "algorithms/split.py",
      "        head_result = local_train(\n"
      "            params, None, data, k_head, apply_fn=apply_fn, preprocess=preprocess, trainable=trains_head, "
      "**head_kwargs\n"
      "        )\n"
      "        params, head_samples = head_result.params, head_result.samples\n"
      "        result = local_train(\n"
      "            params, None, data, k_body, apply_fn=apply_fn, preprocess=preprocess, trainable=trains_body,\n"
      "            **train_kwargs,\n"
      "        )\n",
      "        body_result = local_train(\n"
      "            params, None, data, k_body, apply_fn=apply_fn, preprocess=preprocess, trainable=trains_body,\n"
      "            **train_kwargs,\n"
      "        )\n"
      "        result = local_train(\n"
      "            body_result.params, None, data, k_head, apply_fn=apply_fn, preprocess=preprocess,\n"
      "            trainable=trains_head, **head_kwargs\n"
      "        )\n"
      "        head_samples = result.samples\n",
      ("test_references.py::test_fedrep_head_then_body_by_hand",),
      "FedRep trains the head first (body frozen), then the body with the new head"),
    M("subfedavg_percentile", "algorithms/subfedavg.py",
      "count = jnp.ceil(rate * (active - 1).astype(jnp.float32))",
      "count = jnp.floor(rate * (active - 1).astype(jnp.float32))",
      ("test_subfedavg.py::test_candidates_drop_below_the_percentile_as_numpy_does",),
      "Sub-FedAvg's candidates drop the weights below the prune percentile of |w|, as its reference code does"),
    # --- evaluation protocols --------------------------------------------------------------------------------------
    M("local_protocol_scores_masked_global", "algorithms/fedspa.py",
      "local = Personal(pick(state.local, masked_global.params), pick(state.local_mask, mask), state.trained_round)",
      "local = masked_global",
      ("test_protocols.py::test_local_scores_the_params_of_the_last_participation",),
      "personal_model='local' scores the sparse model the client last trained"),
    M("finetune_without_mask", "algorithms/base.py",
      "result = local_train(personal.params, personal.mask, train_k, key,",
      "result = local_train(personal.params, None, train_k, key,",
      ("test_protocols.py::test_finetuning_equals_training_from_the_scored_model_then_scoring",),
      "local adaptation of a sparse method keeps its mask fixed"),
    # --- resume -----------------------------------------------------------------------------------------------------
    M("resume_accepts_changed_hparams", "resume.py",
      "  if differ:\n    raise ConfigMismatchError(", "  if False:\n    raise ConfigMismatchError(",
      ("test_resume.py::test_a_changed_default_is_named",),
      "a resume whose algorithm resolves its hyperparameters differently is refused"),
    # --- LEAF and TFF readers ---------------------------------------------------------------------------------------
    M("leaf_pixels_not_inverted", "data/natural_formats.py",
      "np.rint((1.0 - x) * 255.0)", "np.rint(x * 255.0)",
      ("test_data_natural.py::test_leaf_femnist_round_trip",),
      "LEAF's FEMNIST pixels are floats with 1.0 = background; stored as MNIST's uint8 (0 = background)"),
    M("leaf_shakespeare_label_dropped", "data/natural_formats.py",
      'np.concatenate([ids, text.encode("".join(ys))[:, None]], axis=1)',
      "np.concatenate([ids, ids[:, -1:]], axis=1)",
      ("test_data_natural.py::test_leaf_shakespeare_is_read_as_split_data_writes_it_and_scored_as_leaf_scores_it",),
      "LEAF's Shakespeare sample is 80 characters followed by its next character y"),
    M("tff_labels_misaligned", "data/natural_formats.py",
      "_labels(labels[()], where, num_classes)", "_labels(labels[()][::-1], where, num_classes)",
      ("test_data_natural.py::test_tff_emnist_round_trip",),
      "TFF's EMNIST label i belongs to pixels i"),
    M("tff_snippets_reordered", "data/natural_formats.py",
      "for s in snippets[()]]", "for s in snippets[()][::-1]]",
      ("test_data_natural.py::test_tff_shakespeare_round_trip",),
      "TFF's Shakespeare snippets are chunked in their stored order"),
    # --- accounting --------------------------------------------------------------------------------------------------
    M("mask_bytes_dearer", "accounting.py",
      "0 if active >= size else min(-(-size // 8), active * index_bytes)",
      "0 if active >= size else max(-(-size // 8), active * index_bytes)",
      ("test_references.py::test_bytes_and_flops_of_a_small_model_by_hand",),
      "a mask costs the cheaper of a bitmap and an index list"),
    M("dense_flops_halved", "models/flops.py",
      "return 2.0 * positions * d_in * d_out", "return 1.0 * positions * d_in * d_out",
      ("test_references.py::test_bytes_and_flops_of_a_small_model_by_hand",),
      "a dense layer's forward pass is 2 x d_in x d_out FLOPs (a multiply and an add per weight)"),
    # --- the claims: donation, the store's chunked init, stops and checkpoints ---------------------------------------
    M("round_not_donated", "algorithms/base.py",
      "round=inflight.paced(jax.jit(round_fn, donate_argnums=0), mesh)",
      "round=inflight.paced(jax.jit(round_fn), mesh)",
      ("test_claims.py::test_the_round_donates_every_leaf_of_its_state",),
      "the round donates its state, so a round costs O(S * P) memory, not a copy of the [K, ...] store"),
    M("store_chunks_overlap", "store.py",
      "ids = first + jnp.minimum(c * chunk + jnp.arange(", "ids = first + jnp.minimum(c * (chunk - 1) + jnp.arange(",
      ("test_claims.py::test_chunked_store_init_is_independent_of_the_chunking",),
      "client k's initial state depends on k alone, not on the chunk it is drawn in"),
    M("second_ctrl_c_exit_status", "cli.py",
      "    return EXIT_INTERRUPTED\n", "    return EXIT_STOPPED\n",
      ("test_claims.py::test_a_second_ctrl_c_exits_130_without_waiting",),
      "a second Ctrl-C exits 130 (interrupted, no new checkpoint), not 75"),
    M("diverged_seed_goes_on", "sweep.py",
      "keep_going=lrs is not None)", "keep_going=True)",
      ("test_claims.py::test_a_diverged_seed_stops_a_sweep_without_lrs",),
      "without --lrs a diverged seed stops the sweep (exit 3); only an lr search records it and goes on"),
    # --- DisPFL (algorithms/dispfl.py) ------------------------------------------------------------------------------
    M("dispfl_plain_mean", "algorithms/dispfl.py",
      "aggregate_masked_mean(models, covers, ones)",
      "aggregate_masked_mean(models, jax.tree.map(jnp.ones_like, covers), ones)",
      ("test_dispfl.py::test_round_equals_the_reference_round",),
      "DisPFL averages each weight over the models whose trained mask covers it (_aggregate_func), not all of them"),
    M("dispfl_picks_itself", "algorithms/dispfl.py",
      "return others + (others >= k).astype(jnp.int32)", "return others",
      ("test_dispfl.py::test_random_neighbours_are_distinct_others_drawn_uniformly",),
      "a client's N neighbours are drawn from the K - 1 others, never itself (_benefit_choose)"),
    M("dispfl_ring_off_by_one", "algorithms/dispfl.py",
      "(k + 1) % num_clients]", "(k + 2) % num_clients]",
      ("test_dispfl.py::test_ring_neighbours_are_left_and_right",),
      "the ring's neighbours of k are k - 1 and k + 1 (cs='ring')"),
    # --- FedDST (algorithms/feddst.py) ------------------------------------------------------------------------------
    M("feddst_unweighted", "algorithms/feddst.py",
      'Common.with_defaults(common, weighting="samples")', 'Common.with_defaults(common, weighting="uniform")',
      ("test_feddst.py::test_clients_of_unequal_sizes_weigh_by_their_samples",),
      "FedDST weighs each client's values and votes by its training samples, as dst.py does"),
    M("feddst_majority_vote", "algorithms/feddst.py",
      "lambda path, v: v > 0 if masks.is_maskable(path, v)", "lambda path, v: v > 0.5 if masks.is_maskable(path, v)",
      ("test_feddst.py::test_round_equals_the_reference_round",),
      "the new global mask is the union of the clients' masks (--min-votes 0), not a majority"),
    M("feddst_reprune_by_old_weights", "algorithms/feddst.py",
      "pruned = prune_to_counts(voted, new, targets)", "pruned = prune_to_counts(voted, x0, targets)",
      ("test_feddst.py::test_votes_and_values_are_weighted_by_samples",),
      "a union denser than the target is magnitude-pruned by the new aggregated weights (layer_prune)"),
    M("feddst_reprune_threshold", "algorithms/feddst.py",
      "> sum(c for _, c in kernels)", "> 2 * sum(c for _, c in kernels)",
      ("test_feddst.py::test_round_equals_the_reference_round",),
      "the server re-prunes as soon as the union is denser than the round's target count"),
    # --- client-level DP (server.py, round.py) ---------------------------------------------------------------------
    M("dp_clip_skipped", "server.py",
      "return (_weighted_sum(clipped, weights), below), norms",
      "return (_weighted_sum(updates, weights), below), norms",
      ("test_privacy.py::test_released_aggregate_is_the_sum_of_clipped_updates_over_the_expected_cohort",),
      "DP-FedAvg sums the clipped updates, each of L2 norm at most C"),
    M("dp_clip_squared_norm", "server.py",
      "norm = jnp.sqrt(sum(jnp.sum(jnp.square(", "norm = (sum(jnp.sum(jnp.square(",
      ("test_privacy.py::test_clipping_bounds_every_sent_update_and_keeps_small_ones",),
      "an update is clipped by its L2 norm over all leaves together"),
    M("dp_noise_std_halved", "server.py",
      "std = sum_noise_multiplier(spec) * clip", "std = 0.5 * sum_noise_multiplier(spec) * clip",
      ("test_privacy.py::test_noise_std_on_the_aggregate_of_zero_updates",),
      "the released sum carries Gaussian noise of std z * C"),
    M("dp_actual_denominator", "round.py",
      "delta, clip = dp_release(total, below, server.clip, dp_key, dp, expected)",
      "delta, clip = dp_release(total, below, server.clip, dp_key, dp, jnp.sum(weights > 0).astype(jnp.float32))",
      ("test_privacy.py::test_noise_std_on_the_aggregate_of_zero_updates",),
      "the DP estimator divides by the expected number of reporting clients, fixed before the round, not the actual"),
    # --- dropouts and stragglers (availability.py, client.py, round.py) ----------------------------------------------
    M("straggler_steps_floor", "client.py",
      "return jnp.round(jnp.asarray(work, jnp.float32) * steps.astype(jnp.float32)).astype(jnp.int32)",
      "return jnp.floor(jnp.asarray(work, jnp.float32) * steps.astype(jnp.float32)).astype(jnp.int32)",
      ("test_availability.py::test_a_straggler_trains_exactly_round_f_steps",),
      "a straggler runs round(straggler_work * steps) local steps"),
    M("dropped_client_weighs", "round.py",
      "state.round, availability, num_clients)\n    weights = jnp.where(fate.reports, weights, 0.0)",
      "state.round, availability, num_clients)\n    weights = jnp.where(fate.reports | True, weights, 0.0)",
      ("test_availability.py::test_the_aggregate_leaves_out_dropped_clients",),
      "a dropped client's update never reaches the server: its aggregation weight is 0"),
    M("unstarted_client_sends", "algorithms/base.py",
      'if "started" in metrics:  # dropouts', 'if False:  # dropouts',
      ("test_availability.py::test_costs_count_the_work_done_a_lost_client_s_too",),
      "a client that never started received and sent nothing: its bytes are 0"),
    M("lost_client_work_uncounted", "algorithms/base.py",
      "samples = sum(metrics[k] for k in sample_keys)",
      'samples = sum(jnp.where(metrics["weight"] > 0, metrics[k], 0) for k in sample_keys)',
      ("test_availability.py::test_a_dense_method_counts_the_samples_of_clients_that_trained",),
      "training FLOPs count every sample trained on, a lost client's too"),
    # --- recipe knobs and recipes (algorithms/base.py, data/partitioners.py, recipes.py) -----------------------------
    M("clip_mode_swapped", "algorithms/base.py",
      'dense = self.clip_mode == "dense"', 'dense = self.clip_mode == "masked"',
      ("test_recipe_knobs.py::test_dense_and_masked_clipping_differ_exactly_as_by_hand",),
      "clip_mode='dense' clips the whole gradient before the mask, 'masked' the masked gradient"),
    M("dirichlet_balanced_unequal", "data/partitioners.py",
      "apportion(len(labels), np.ones(num_clients))", "apportion(len(labels), np.arange(1.0, num_clients + 1))",
      ("test_recipe_knobs.py::test_balanced_dirichlet_gives_equal_sizes_and_label_matched_test_sets",),
      "dirichlet_balanced gives every client N / K samples (DisPFL's 'dir' split)"),
    M("recipe_ditto_lambda_changed", "recipes.py",
      '"ditto_lambda": 0.5,', '"ditto_lambda": 0.25,',
      ("test_recipes.py::test_dispfl_recipe_matches_the_table",),
      "a recipe value is the one its cited file holds (ditto/cifar10.sh: --lamda 0.5)"),
    # --- natural data readers (data/natural_formats.py, data/text.py) ------------------------------------------------
    M("leaf_num_samples_contract", "data/natural_formats.py",
      "      mismatches.append((path, str(user), hints[str(user)], len(xs)))",
      '      raise DataFormatError(f"{where}: num_samples says {hints[str(user)]}, user_data holds {len(xs)}")',
      ("test_data_natural.py::test_leaf_num_samples_is_a_hint",),
      "LEAF's num_samples is a hint (its reader ignores it; its Shakespeare test files all disagree): read user_data"),
    M("tff_vocabulary_reordered", "data/text.py",
      'TFF_CHARACTERS = ("dhlptx@', 'TFF_CHARACTERS = ("hdlptx@',
      ("test_data_natural.py::test_vocabulary",),
      "TFF's Shakespeare token i is CHAR_VOCAB[i - 1], in TFF's order"),
    M("tff_snippet_without_eos", "data/text.py",
      "out[len(ids) + 1] = TFF_EOS", "out[len(ids) + 1] = PAD",
      ("test_data_natural.py::test_tff_sqlite_shakespeare_is_tffs_task",),
      "TFF wraps each snippet in BOS and EOS before padding and cutting rows"),
    # --- the run wrapper: deadline and stop (preemption.py, runner.py) -----------------------------------------------
    M("deadline_first_gap_uncounted", "preemption.py",
      "self._last_check = now  # the first gap", 'self._last_check = float("inf")  # the first gap',
      ("test_job.py::test_the_first_gap_counts_from_the_start",),
      "the deadline's first gap counts from the Stopper's creation: start-up and compilation bound the first dispatch"),
    M("stop_evaluates_before_saving", "runner.py",
      "      if stopping:  # the checkpoint first; this round's evaluation is the resumed run's first work\n"
      "        save(r, state)\n",
      "      if stopping:  # the checkpoint first; this round's evaluation is the resumed run's first work\n"
      "        if evaluating:\n"
      "          evaluate()\n"
      "        save(r, state)\n",
      ("test_job.py::test_a_dispatch_longer_than_half_the_deadline_stops_at_the_first_boundary_and_saves_before_"
       "evaluating",),
      "a stop saves the checkpoint first; the round's evaluation is the resumed run's first work"),
    # --- PruneFL (issue 29) -------------------------------------------------------------------------------------------
    M("prunefl_importance_abs", "algorithms/prunefl.py",
      '"importance": jax.tree.map(lambda g: jnp.square(g).astype(jnp.float32), grad_sum)},',
      '"importance": jax.tree.map(lambda g: jnp.abs(g).astype(jnp.float32), grad_sum)},',
      ("test_prunefl.py::test_round_equals_the_reference_round",),
      "PruneFL's importance is the squared sum of a client's gradients (|g| ranks weights differently)"),
    M("prunefl_selection_ignores_cost", "mask_update.py",
      "jnp.where(candidate, score_leaves[i] / cost, -jnp.inf)", "jnp.where(candidate, score_leaves[i], -jnp.inf)",
      ("test_prunefl.py::test_selection_matches_the_reference_heap_across_layers",),
      "PruneFL takes candidates by importance per unit of cost, not by importance alone"),
    M("prunefl_drop_ceil", "mask_update.py",
      "drop = jnp.floor(decrease * jnp.sum(m, dtype=jnp.int32)).astype(jnp.int32)",
      "drop = jnp.ceil(decrease * jnp.sum(m, dtype=jnp.int32)).astype(jnp.int32)",
      ("test_prunefl.py",),
      "PruneFL's readjustment may drop floor(decrease * active) weights of a layer (the reference's int())"),
]


def apply(tree: pathlib.Path, mutation: Mutation) -> None:
  path = tree / "src" / "fedspa_jax" / mutation.file
  text = path.read_text()
  path.write_text(text.replace(mutation.old, mutation.new, 1))


def stale(mutation: Mutation) -> str | None:
  """Why the mutation cannot be applied to today's tree, or None."""
  path = ROOT / "src" / "fedspa_jax" / mutation.file
  if not path.is_file():
    return f"no file src/fedspa_jax/{mutation.file}"
  found = path.read_text().count(mutation.old)
  if found != 1:
    return f"its old text occurs {found} times in src/fedspa_jax/{mutation.file} (must be exactly once)"
  for test in mutation.tests:
    if not (ROOT / "tests" / test.split("::")[0]).is_file():
      return f"no test file tests/{test.split('::')[0]}"
  return None


def scratch_copy(parent: pathlib.Path, name: str) -> pathlib.Path:
  tree = parent / name
  tree.mkdir()
  for item in COPIED:
    source = ROOT / item
    if source.is_dir():
      shutil.copytree(source, tree / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    else:
      shutil.copy2(source, tree / item)
  return tree


def run_tests(tree: pathlib.Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
  env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
  command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider",
             *[f"tests/{t}" for t in tests]]
  start = time.monotonic()
  try:
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return -1, "timed out", time.monotonic() - start
  return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def last_line(output: str) -> str:
  lines = [line for line in output.strip().splitlines() if line.strip() and not line.startswith(("=", "  "))]
  return lines[-1][:160] if lines else ""


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--jobs", type=int, default=1, help="mutations run at the same time (default 1)")
  parser.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
  parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the named tests")
  args = parser.parse_args(argv)

  names = [m.name for m in MUTATIONS]
  if len(set(names)) != len(names):
    print("duplicate mutation names", file=sys.stderr)
    return 1
  chosen = MUTATIONS
  if args.only:
    unknown = sorted(set(args.only) - set(names))
    if unknown:
      print(f"unknown mutations {unknown}; --list shows them", file=sys.stderr)
      return 2
    chosen = [m for m in MUTATIONS if m.name in args.only]
  if args.list:
    for m in chosen:
      print(f"{m.name}  [{m.file}]  {m.why}\n    killed by: {' '.join(m.tests)}")
    return 0
  if args.jobs < 1:
    print("--jobs must be >= 1", file=sys.stderr)
    return 2

  failed = False
  runnable = []
  for m in chosen:
    reason = stale(m)
    if reason:
      print(f"STALE     {m.name}: {reason}", flush=True)
      failed = True
    else:
      runnable.append(m)

  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="fedspa-mutation-") as tmp:
    tmp = pathlib.Path(tmp)
    if not args.no_baseline and runnable:
      tests = tuple(dict.fromkeys(t for m in runnable for t in m.tests))
      tree = scratch_copy(tmp, "baseline")
      rc, output, seconds = run_tests(tree, tests, args.timeout)
      if rc != 0:
        print(f"BASELINE FAILED ({seconds:.0f} s, rc {rc}): the named tests must pass on the unmutated tree\n{output}")
        return 1
      print(f"baseline  {len(tests)} tests pass unmutated ({seconds:.0f} s)", flush=True)

    def one(m: Mutation) -> tuple[Mutation, str, str, float]:
      tree = scratch_copy(tmp, m.name)
      apply(tree, m)
      rc, output, seconds = run_tests(tree, m.tests, args.timeout)
      shutil.rmtree(tree, ignore_errors=True)
      if rc == 1:
        return m, "killed", last_line(output), seconds
      if rc == 0:
        return m, "SURVIVED", last_line(output), seconds
      return m, "ERROR", f"rc {rc}: {last_line(output)}", seconds

    counts = {"killed": 0, "SURVIVED": 0, "ERROR": 0}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
      for m, verdict, detail, seconds in pool.map(one, runnable):
        counts[verdict] += 1
        print(f"{verdict:<9} {m.name} ({seconds:.0f} s; {' '.join(m.tests)})\n          {detail}", flush=True)
  failed = failed or counts["SURVIVED"] > 0 or counts["ERROR"] > 0
  total = time.monotonic() - start
  print(f"\n{counts['killed']} killed, {counts['SURVIVED']} survived, {counts['ERROR']} errors, "
        f"{len(chosen) - len(runnable)} stale of {len(chosen)} mutations in {total:.0f} s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
