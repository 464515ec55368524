"""Reedfrogs: Statistical Rethinking's varying-intercepts model m13.2, by VI and by NUTS.

    python examples/reedfrogs.py [--output-dir DIR] [--fast] [--seed 0]

48 tanks of tadpoles (Vonesh and Bolker 2005); tank i started with n_i tadpoles and
S_i survived:

    S_i ~ Binomial(n_i, p_i),  logit(p_i) = a[tank_i]
    a[tank] ~ Normal(a_bar, sigma),  a_bar ~ Normal(0, 1.5),  sigma ~ Exponential(1)

reffects fits it as a Keras model trained by `fit` (variational inference: a_bar is a
`GlobalIntercept`, a - a_bar a `RandomIntercept` with an Exponential(1) hyperprior on its
scale, the likelihood Binomial with the tank size as trials). TFP's No-U-Turn sampler fits
the same model, written as a `JointDistribution`, in 4 chains. The script prints R-hat and
effective sample sizes, a side-by-side table of a_bar, sigma and the 48 survival
probabilities, and saves two plots: the posterior survival of each tank against its raw
proportion (`reedfrogs_tanks.png`) and the shrinkage against tank size
(`reedfrogs_shrinkage.png`). `--fast` runs a small version in seconds, for tests.
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

from reffects import (  # noqa: E402
    ELBOModel,
    Exponential,
    GlobalIntercept,
    RandomIntercept,
    sample_predictive,
)
from reffects.datasets import load_reedfrogs  # noqa: E402

tfd, tfb = tfp.distributions, tfp.bijectors
tf.get_logger().setLevel("ERROR")  # TFP's ESS casts its FFT's complex output, with a warning

NUM_CHAINS = 4
FULL = {"vi_steps": 3000, "nuts_draws": 1000, "nuts_burnin": 1000, "jit_compile": True}
# XLA compiles the sampler in ~15 s, then runs 2,000 steps in ~1 s where graph mode takes ~20 s;
# for the few steps of a fast run graph mode is quicker overall.
FAST = {"vi_steps": 300, "nuts_draws": 50, "nuts_burnin": 50, "jit_compile": False}
BATCH_SIZE = 8
STEPS_PER_EXECUTION = 50


def fit_vi(frogs: pd.DataFrame, steps: int, num_samples: int, seed: int) -> dict:
    """m13.2 by variational inference through `ELBOModel.fit`; returns posterior draws."""
    num_tanks = len(frogs)
    tank = keras.Input(shape=(), dtype="int64", name="tank")
    survival = frogs["surv"].sum() / frogs["density"].sum()
    a_bar = GlobalIntercept(
        prior_scale=1.5,
        loc_initializer=keras.initializers.Constant(np.log(survival / (1 - survival))),
        seed=seed,
        name="a_bar",
    )(tank)
    layer = RandomIntercept(
        num_tanks, scale_prior=Exponential(1.0), seed=seed + 1, name="tank_offset"
    )
    network = keras.Model(tank, keras.layers.Add(name="logit_p")([a_bar, layer(tank)]))
    model = ELBOModel(network, likelihood="binomial", num_examples=num_tanks)

    # An endless stream of shuffled batches of 8 tanks, so Keras pays its per-epoch cost a
    # few times, not once per pass over 48 rows; a stream needs N and the group counts
    # stated. y is the proportion surviving and the sample weight the trials, as in R's glm.
    tanks = np.arange(num_tanks)
    layer.adapt(tanks)
    stream = (
        tf.data.Dataset.from_tensor_slices(
            (tanks, frogs["propsurv"].to_numpy("float32"), frogs["density"].to_numpy("float32"))
        )
        .repeat()
        .shuffle(num_tanks, seed=seed)
        .batch(BATCH_SIZE)
    )
    # The learning rate decays along a cosine so that the last steps average out the Monte
    # Carlo noise of the ELBO gradient.
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(0.05, steps, 0.01)),
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    start = time.perf_counter()
    model.fit(stream, epochs=10, steps_per_epoch=steps // 10, shuffle=False, verbose=0)
    fit_time = time.perf_counter() - start
    q_a_bar = network.get_layer("a_bar").posterior()
    sigma = layer.sample_group_scale(num_samples, seed=seed)
    draws = sample_predictive(model, tanks, num_samples, seed=seed)
    return {
        "a_bar": q_a_bar.sample(num_samples, seed=tf.constant([seed, 1])).numpy()[:, 0],
        "sigma": keras.ops.convert_to_numpy(sigma)[:, 0],
        "p": draws["mean"][:, :, 0],
        "seconds": fit_time,
    }


def reedfrogs_joint_distribution(density) -> tfd.JointDistributionNamedAutoBatched:
    """m13.2 as a TFP joint distribution, centred as in the book."""
    density = tf.constant(density, tf.float32)
    return tfd.JointDistributionNamedAutoBatched(
        {
            "a_bar": tfd.Normal(0.0, 1.5),
            "sigma": tfd.Exponential(1.0),
            "a": lambda a_bar, sigma: tfd.Sample(tfd.Normal(a_bar, sigma), len(density)),
            "surv": lambda a: tfd.Binomial(total_count=density, logits=a),
        }
    )


def fit_nuts(frogs, num_draws: int, num_burnin: int, jit_compile: bool, seed: int) -> dict:
    """m13.2 by NUTS: 4 chains, step size adapted by dual averaging during burn-in."""
    model = reedfrogs_joint_distribution(frogs["density"].to_numpy())
    surv = tf.constant(frogs["surv"].to_numpy(), tf.float32)

    def target_log_prob(a_bar, sigma, a):
        return model.log_prob({"a_bar": a_bar, "sigma": sigma, "a": a, "surv": surv})

    kernel = tfp.mcmc.DualAveragingStepSizeAdaptation(
        tfp.mcmc.TransformedTransitionKernel(
            tfp.mcmc.NoUTurnSampler(target_log_prob, step_size=0.1),
            bijector=[tfb.Identity(), tfb.Exp(), tfb.Identity()],
        ),
        num_adaptation_steps=int(0.8 * num_burnin),
        target_accept_prob=0.9,  # smaller steps: fewer divergences in the funnel of sigma
    )

    @tf.function(jit_compile=jit_compile, autograph=False)
    def sample(chain_seed):
        initial = [tf.zeros([NUM_CHAINS]), tf.ones([NUM_CHAINS]), tf.zeros([NUM_CHAINS, 48])]
        return tfp.mcmc.sample_chain(
            num_draws,
            initial,
            kernel=kernel,
            num_burnin_steps=num_burnin,
            trace_fn=lambda _, results: results.inner_results.inner_results.has_divergence,
            seed=chain_seed,
        )

    start = time.perf_counter()
    (a_bar, sigma, a), diverging = sample(tf.constant([seed, 7], tf.int32))
    seconds = time.perf_counter() - start

    def diagnostics(draws):
        return (
            tfp.mcmc.potential_scale_reduction(draws).numpy(),
            tfp.mcmc.effective_sample_size(draws, cross_chain_dims=1).numpy(),
        )

    return {
        "a_bar": a_bar.numpy().reshape(-1),
        "sigma": sigma.numpy().reshape(-1),
        "p": tf.sigmoid(a).numpy().reshape(-1, a.shape[-1]),
        "diagnostics": {
            "a_bar": diagnostics(a_bar),
            "sigma": diagnostics(sigma),
            "a": diagnostics(a),
        },
        "divergences": int(tf.reduce_sum(tf.cast(diverging, tf.int32))),
        "seconds": seconds,
    }


def comparison_table(vi: dict, nuts: dict) -> pd.DataFrame:
    """Posterior mean and sd of a_bar, sigma and each tank's p under VI and NUTS."""
    names = ["a_bar", "sigma"] + [f"p[{i + 1}]" for i in range(vi["p"].shape[1])]

    def columns(fit):
        draws = np.column_stack([fit["a_bar"], fit["sigma"], fit["p"]])
        return draws.mean(axis=0), draws.std(axis=0)

    vi_mean, vi_sd = columns(vi)
    nuts_mean, nuts_sd = columns(nuts)
    return pd.DataFrame(
        {
            "VI mean": vi_mean,
            "VI sd": vi_sd,
            "NUTS mean": nuts_mean,
            "NUTS sd": nuts_sd,
            "difference": vi_mean - nuts_mean,
        },
        index=pd.Index(names, name="parameter"),
    )


def plot_tanks(frogs, vi, nuts, path):
    """Posterior survival per tank (50% intervals) against the raw proportion."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    tank = np.arange(1, len(frogs) + 1)
    ax.scatter(tank, frogs["propsurv"], color="tab:blue", s=25, label="raw proportion", zorder=3)
    for fit, name, shift, color in ((nuts, "NUTS", -0.18, "k"), (vi, "VI", 0.18, "tab:red")):
        mean = fit["p"].mean(axis=0)
        lower, upper = np.quantile(fit["p"], [0.25, 0.75], axis=0)
        ax.errorbar(
            tank + shift,
            mean,
            yerr=[mean - lower, upper - mean],
            fmt="o",
            mfc="white",
            color=color,
            ms=4,
            lw=1,
            label=f"{name} posterior mean, 50% interval",
        )
    grand_mean = float(np.mean(1.0 / (1.0 + np.exp(-nuts["a_bar"]))))
    ax.axhline(grand_mean, ls="--", color="gray", lw=1, label="grand mean, inv_logit(a_bar)")
    for edge in (16.5, 32.5):
        ax.axvline(edge, color="gray", lw=0.8)
    for centre, label in zip((8.5, 24.5, 40.5), ("small tanks (10)", "medium (25)", "large (35)")):
        ax.text(centre, 0.02, label, ha="center", va="bottom", fontsize=9)
    ax.set(xlabel="tank", ylabel="proportion survived", ylim=(0, 1.05), xlim=(0, 49))
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_shrinkage(frogs, vi, nuts, path):
    """Posterior mean minus raw proportion against tank size: small tanks shrink most."""
    fig, ax = plt.subplots(figsize=(6, 4))
    jitter = np.random.default_rng(0).uniform(-0.8, 0.8, len(frogs))
    for fit, name, shift, color in ((nuts, "NUTS", -0.9, "k"), (vi, "VI", 0.9, "tab:red")):
        shrinkage = fit["p"].mean(axis=0) - frogs["propsurv"].to_numpy()
        ax.scatter(frogs["density"] + shift + jitter, shrinkage, s=14, color=color, label=name)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set(
        xlabel="tank size (initial tadpoles)",
        ylabel="posterior mean - raw proportion",
        xticks=sorted(frogs["density"].unique()),
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(output_dir=".", fast: bool = False, seed: int = 0) -> dict:
    """Fits m13.2 both ways, prints the comparison and saves the plots; returns the results."""
    settings = FAST if fast else FULL
    frogs = load_reedfrogs()
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    vi = fit_vi(frogs, settings["vi_steps"], NUM_CHAINS * settings["nuts_draws"], seed)
    nuts = fit_nuts(
        frogs, settings["nuts_draws"], settings["nuts_burnin"], settings["jit_compile"], seed
    )
    table = comparison_table(vi, nuts)

    print(f"VI (ELBOModel.fit): {vi['seconds']:.1f} s")
    print(
        f"NUTS: {NUM_CHAINS} chains x {settings['nuts_draws']} draws after "
        f"{settings['nuts_burnin']} burn-in, {nuts['seconds']:.1f} s "
        f"(jit_compile={settings['jit_compile']}), {nuts['divergences']} divergent transitions"
    )
    for name, (rhat, ess) in nuts["diagnostics"].items():
        rhat, ess = np.atleast_1d(rhat), np.atleast_1d(ess)
        print(f"  {name:6s} R-hat max {rhat.max():.3f}   ESS min {ess.min():.0f}")
    with pd.option_context("display.max_rows", 60, "display.float_format", "{:.3f}".format):
        print(table)
    tank_difference = float(np.mean(np.abs(table["difference"].iloc[2:])))
    print(
        f"a_bar difference {table.loc['a_bar', 'difference']:+.3f}, sigma difference "
        f"{table.loc['sigma', 'difference']:+.3f}, mean |difference| of the 48 tank "
        f"probabilities {tank_difference:.4f}"
    )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plots = [output_dir / "reedfrogs_tanks.png", output_dir / "reedfrogs_shrinkage.png"]
    plot_tanks(frogs, vi, nuts, plots[0])
    plot_shrinkage(frogs, vi, nuts, plots[1])
    seconds = time.perf_counter() - start
    print(f"plots: {', '.join(map(str, plots))}; total {seconds:.0f} s")
    return {
        "table": table,
        "tank_difference": tank_difference,
        "nuts": nuts,
        "plots": plots,
        "seconds": seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=".", help="where the PNG plots go")
    parser.add_argument("--fast", action="store_true", help="a small run, for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.output_dir, args.fast, args.seed)


if __name__ == "__main__":
    main()
