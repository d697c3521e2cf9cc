"""What people read and look at: terminal text, plots, HTML reports and the output folders that hold them."""
