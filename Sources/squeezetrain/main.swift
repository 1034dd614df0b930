print("squeezetrain")
