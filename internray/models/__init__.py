"""Model configs, checkpoint export and import: the layer every stage loads models through."""
