"""ndot: online training of spiking neural networks (NDOT, OTTT, SLTT, BPTT).

`import ndot` imports no submodule; the entry points from Python:

    ndot.config.TrainConfig      one run's configuration (every field of `python -m ndot.train --help`)
    ndot.train.train(cfg)        train it; on_epoch(metrics, state) gets each epoch's metrics and checkpoint,
                                 the result (TrainResult) the trained network as .model
    ndot.checkpoint.save/load    write and read such a state; ndot.evaluate.model_of builds its network
    ndot.evaluate.evaluate       test metrics of a model over a loader (ndot.data.loaders(cfg, device))
    ndot.models.build            an architecture by name (ARCHS); SpikingNet for a network of your own
    ndot.layers                  WSConv2d, LIF, Seq, avg_pool; configure(model, rule), reset_state(model)
    ndot.step.train_batch        one batch under a rule and mode; eval_batch its evaluation
    ndot.neuron.neuron_step      one step of a layer of neurons on tensors (u, s, trace â, factor e)
    ndot.results.load            a sweep's Parquet tables
"""
