from arbd.data.corpus import main

main()
