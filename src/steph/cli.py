def main():
    raise SystemExit("steph CLI is not built yet")
