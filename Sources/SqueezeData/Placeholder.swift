// placeholder until the data module lands
