"""The names the callbacks write, for whatever reads them back (the report, the study, the dashboard).

No torch or Lightning import: a reader of a finished run imports these without loading either.
"""

EVENTS_FILE = "stall_events.json"  # in the run directory: every stall and divergence, with its actions

GRAD_NORM = "grad_norm/"  # + a layer name (``grad_norm/layers.0``), or one of the two below
GRAD_NORM_TOTAL = "grad_norm/total"
GRAD_NORM_FIRST_TO_LAST = "grad_norm/first_to_last"
# + a layer name: log10 of its gradient norm (a zero norm reads -30), so that norms spanning 1e-15 .. 1e-1
# share one readable chart; TensorBoard's custom-scalar charts have no log axis.
GRAD_NORM_LOG10 = "grad_norm_log10/"
LOG10_FLOOR = -30.0

PLATEAU = "plateau/"  # + an event kind: ``plateau/stall``, ``plateau/divergence`` (markers on the step axis)
PLATEAU_EVENTS_TEXT = "plateau/events"
PLATEAU_ACTIONS_TEXT = "plateau/actions"

OPTIM_LR = "optim/lr"
OPTIM_MOMENTUM = "optim/momentum"

FINAL = "final/"  # + a metric name: the hparams table's columns (``final/train/loss``, ``final/stalls``)
FINAL_STALLS = "final/stalls"
FINAL_EPOCHS = "final/epochs"

# LayerStatsMonitor: + a layer name (``saturated/layers.0``). A monitor with a margin other than the
# default writes ``saturated_m<margin>/``, so that two monitors keep apart.
ACT_MEAN = "act_mean/"
ACT_STD = "act_std/"
SATURATED = "saturated/"
DEAD = "dead/"
UPDATE_RATIO_LOG10 = "update_ratio_log10/"  # log10(||W_after - W_before|| / ||W_before||)
UPDATE_RATIO_REFERENCE = "update_ratio_log10/reference"  # a line at -3, Karpathy's healthy rate
GRAD_TO_WEIGHT = "grad_to_weight/"
HIST_ACTIVATION = "hist_activation/"
HIST_GRADIENT = "hist_gradient/"
HIST_WEIGHT = "hist_weight/"


def grad_norm_prefix(norm_type: float) -> str:
    """Where a GradNormMonitor of this norm type writes: ``grad_norm/`` for the 2-norm, else
    ``grad_norm_p<p>/`` (``grad_norm_pinf/``), so that two monitors keep apart.

    >>> grad_norm_prefix(2.0), grad_norm_prefix(float("inf")), grad_norm_prefix(1)
    ('grad_norm/', 'grad_norm_pinf/', 'grad_norm_p1/')
    """
    return GRAD_NORM if float(norm_type) == 2.0 else f"grad_norm_p{float(norm_type):g}/"
