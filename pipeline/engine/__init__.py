"""The engine: the config (`config`, `config_reference`), the stages found (`registry`), what is up to date
(`status`), running stages in order (`runner`) and the variants a stage reads (`variants`). The only code
that imports the `stages` package."""
