"""graft: adapt a pretrained encoder to a small labelled data set, and prove the transfer paid off."""

__version__ = "0.1.0"
