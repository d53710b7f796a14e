"""Class-conditional 8 x 8 digits (scikit-learn) with a small DiT, guidance and one-step sampling."""
