from steph.cli import main

main()
