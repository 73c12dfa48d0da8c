"""The stages whose output is a predictions folder (`pipeline.evaluation.predictions`): what smooth, pseudo and submit may read."""

PREDICTING_STAGES = ("finetune", "bnretrain", "tune", "ensemble", "cv", "smooth", "pseudo", "blend")
