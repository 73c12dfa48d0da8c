"""`python -m pipeline.kaggle.local`: serve ../shared/data/competitions to the kaggle client."""
from pipeline.kaggle.local.server import main

main()
