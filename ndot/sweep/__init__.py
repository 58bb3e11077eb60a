"""Ray Tune + Optuna sweeps over time steps, architectures and learning rates.

definitions  the three sweeps and their presets
space        strata and the Optuna define-by-run space
searcher     equal Optuna (TPE) budgets per stratum
scheduler    ASHA early stopping within a stratum
resources    how many trials fit at once, on a fixed or an autoscaling cluster
reach        whether every node of the cluster reaches a local --storage and imports --set imports' modules
trainable    the Tune function trainable around ndot.train.train
activity     what running trials do before their first epoch result, for the status lines
progress     the driver's lines: one per finished trial, and the status line every few minutes
recorder     keeps the Parquet tables and TensorBoard's files current, and a finished trial's last checkpoint alone
state_sync   holds each save of Tune's experiment state until the last upload has ended
runner       builds, runs and resumes the Tune experiment
cli          the command line shared by the scripts in sweeps/
"""
