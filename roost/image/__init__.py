"""Guest images roost builds itself: the demo plugin (`roost.image.demo`)."""
