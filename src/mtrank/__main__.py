from mtrank.cli import main

main()
