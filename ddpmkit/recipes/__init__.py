"""Training recipes: image and toy runs, wiring data, network, objective and evaluation into the
one `Trainer` (`recipes.image.launch`, `recipes.toy.train_toy`), sharing resume and stop
handling (`recipes.common`)."""
