"""cpt.pipelines: the Beam side. Pure text functions (`cpt.pipelines.text`), DoFns, IO and presets."""
