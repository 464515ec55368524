import numpy as np

from reffects import demo
from reffects.datasets import load_reedfrogs, make_housing


def test_demo_runs_and_each_model_improves_on_the_last():
    table = demo.run(num_rows=3000, num_zipcodes=40, epochs=40)
    assert list(table.index) == list(demo.MODELS)
    mae = table["validation MAE"].to_numpy()
    # Zip offsets (sd 0.30) and the nonlinear terms are both large next to the noise (0.25),
    # so each added component must lower the validation MAE.
    assert mae[0] > mae[1] > mae[2]
    assert np.isnan(table["sigma_zipcode"].iloc[0])
    # sigma_zipcode is 0.30 in truth; 40 zip codes estimate it to about +-0.03 (0.3/sqrt(80)).
    assert abs(table["sigma_zipcode"].iloc[1] - 0.30) < 0.1


def test_bundled_and_simulated_data():
    frogs = load_reedfrogs()
    assert frogs.shape == (48, 5)
    assert (frogs["surv"] <= frogs["density"]).all()
    X, y = make_housing(500, 10, seed=1)
    assert X.shape == (500, 4) and len(y) == 500
    X_again, _ = make_housing(500, 10, seed=1)
    assert X.equals(X_again)
