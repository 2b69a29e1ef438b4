"""The planning wizard: ``screen`` holds the WizardScreen, one module per step beside it
(data, model, method, memory, inference, training, review) and ``draft`` the shared answers."""
