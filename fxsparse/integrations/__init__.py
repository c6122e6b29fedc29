"""Where users already train: one module per framework, each an optional extra.

==========================================  ==========================  =======================
module                                      what                        extra
==========================================  ==========================  =======================
:mod:`fxsparse.integrations.transformers`   ``SparseTrainingCallback``  ``fxsparse[transformers]``
                                            for ``transformers.Trainer``
:mod:`fxsparse.integrations.lightning`      ``SparseTrainingCallback``  ``fxsparse[lightning]``
                                            for ``lightning.Trainer``
:mod:`fxsparse.integrations.accelerate`     ``prepare``: the scheduler  ``fxsparse[accelerate]``
                                            for an ``Accelerator`` loop
==========================================  ==========================  =======================

Importing this package imports none of them; :mod:`fxsparse.integrations.common` holds what they
share (finding the sparse module inside a framework's wrappers, skipping one optimizer step).
"""
