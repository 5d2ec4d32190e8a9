"""cpt.trainer: the torch side. Never imports Beam or cpt.pipelines."""
