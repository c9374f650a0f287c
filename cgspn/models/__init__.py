"""Models: the DINOv2-layout ViT (teacher and isomorphic baseline), the C-GSPN student, adaptors."""
