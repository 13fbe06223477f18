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
